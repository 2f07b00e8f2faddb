import Synchronization
// One loop iteration (QEMU aio_poll, try_poll_mode, run_poll_handlers, aio_dispatch_handler).
extension AioContext {
    /// Runs one iteration of the loop: optionally busy-polls, waits for events (only if
    /// `blocking` and nothing is ready), then dispatches, in this order, completed I/O,
    /// bottom halves, ready fd handlers and expired timers. Home thread only; may be called
    /// from inside a callback (a nested iteration).
    ///
    /// - Returns: whether progress was made, as QEMU defines it: a non-idle BH, an fd or
    ///   poll handler other than the context's own notifier, a completion or a timer ran.
    ///   A bare ``notify()`` is not progress.
    @discardableResult
    public func poll(blocking: Bool) -> Bool {
        assertOnHomeThread("poll(blocking:)")
        statistics._iterations.bump()
        depth += 1
        defer {
            depth -= 1
            // Nothing of the loop's runs above the outermost iteration: what nested ones
            // parked can go now.
            if depth == 0 && !parkedReleases.isEmpty { releaseParked() }
        }
        // No busy-poll or dispatch loop is running above a top-level iteration: retired
        // handlers go now (unless one is still on the ready list, which walks unretained).
        if depth == 1 && !retiredHandlers.isEmpty && readyHead == readyHandlers.count {
            retiredHandlers.removeAll(keepingCapacity: true)
        }
        applyPendingChanges()
        // Acquire: pairs with the setters' release (see applyParameterChanges).
        if parametersChanged.load(ordering: .acquiring) != 0 { applyParameterChanges() }
        let params = pollParameters
        var progress = false
        let start: Int64 = params.maxNs != 0 ? monotonicNanoseconds() : 0
        var timeout: Int64 = blocking ? computeTimeout() : 0

        var windowEnd: Int64 = 0  // the poll window's last clock reading, if one ran
        if params.maxNs != 0 || pollStarted {
            progress = tryPollMode(&timeout, windowEnd: &windowEnd) || progress
        }

        // Consumer half of the Dekker pair with notify(): announce that we may block, then
        // look at `notified`. Both seq_cst: either we see a producer's flag and do not block,
        // or the producer sees our announcement and writes the eventfd.
        let announced = timeout != 0
        if announced {
            wake.pointee.notifyMe.add(2, ordering: .sequentiallyConsistent)
            if wake.pointee.notified.load(ordering: .sequentiallyConsistent) { timeout = 0 }
        }
        var waited = false
        if timeout != 0 || monitor.needsWait {
            waited = true
            if timeout != 0 && pollSetStarted(false) {
                // The final poll after poll-end found work that raced with re-enabling
                // notifications.
                timeout = 0
                progress = true
            }
            if timeout != 0 {
                let t0 = monotonicNanoseconds()
                statistics._blockingWaits.bump()
                monitor.wait(timeout: timeout)
                statistics._blockedNanoseconds.bump(UInt64(max(0, monotonicNanoseconds() - t0)))
            } else {
                monitor.wait(timeout: 0)
            }
        }
        if announced {
            // Release: finish the wait before withdrawing the announcement.
            wake.pointee.notifyMe.subtract(2, ordering: .releasing)
        }
        notifyAccept()

        // QEMU's block_ns: entry to the end of the wait. When there was no wait, the poll
        // window's last clock reading is that moment (it found the work), so no third
        // clock read is spent on it.
        var blockNs: Int64 = 0
        if params.maxNs != 0 {
            blockNs = (waited || windowEnd == 0 ? monotonicNanoseconds() : windowEnd) - start
        }
        progress = dispatchCompletions() || progress
        progress = runBottomHalves() || progress
        progress = dispatchReadyHandlers(blockNs: blockNs, params) || progress
        // Completions a handler handed over (the epoll backend's worker pool) run now, not a
        // whole iteration later.
        progress = dispatchCompletions() || progress
        progress = runTimers() || progress
        return progress
    }

    /// The timeout of a blocking wait in ns (-1: infinite): 0 with work already queued, else
    /// the sooner of the BH part and the next timer (QEMU `aio_compute_timeout`).
    func computeTimeout() -> Int64 {
        if requests.pointee.hasReady || readyHead < readyHandlers.count { return 0 }
        let bh = bottomHalfTimeout()
        if bh == 0 { return 0 }
        let timers = timerTimeout()
        if timers == 0 { return 0 }
        return soonest(bh, timers)
    }

    // MARK: - Adaptive polling

    /// QEMU `try_poll_mode`: busy-poll for up to the longest window of the handlers in the
    /// poll list, capped by the timeout.
    /// `windowEnd` is set to the window's last clock reading if it ran.
    func tryPollMode(_ timeout: inout Int64, windowEnd: inout Int64) -> Bool {
        guard !pollHandlers.isEmpty else { return false }
        var maxNs: Int64 = 0
        for i in pollHandlers.indices where pollHandlers[i].pollNs > maxNs { maxNs = pollHandlers[i].pollNs }
        maxNs = soonest(timeout, maxNs)
        guard maxNs > 0 else { return false }
        // Better than QEMU: queued SQEs (re-armed polls, new requests) go to the kernel now
        // instead of disabling polling for this iteration; only ready CQEs stop it.
        monitor.prepareForPolling()
        guard !monitor.eventsReady else { return false }
        _ = pollSetStarted(true)
        return runPollHandlers(maxNs: maxNs, &timeout, windowEnd: &windowEnd)
    }

    func runPollHandlers(maxNs initialMax: Int64, _ timeout: inout Int64, windowEnd: inout Int64) -> Bool {
        var progress = false
        var maxNs = initialMax
        let start = monotonicNanoseconds()
        var now = start
        var elapsed: Int64 = 0
        repeat {
            progress = runPollHandlersOnce(now: now, &timeout) || progress
            // Found work: this spin's clock reading is recent enough; leave at once.
            if timeout == 0 { break }
            now = monotonicNanoseconds()
            elapsed = now - start
            maxNs = soonest(timeout, maxNs)
            if monitor.eventsReady {
                // io_uring: a CQE is waiting; stop polling but stay in poll mode.
                if monitor.supportsUserspacePolling { timeout = 0 }
                break
            }
        } while elapsed < maxNs
        windowEnd = now
        if removeIdlePollHandlers(now: now, &timeout) { progress = true }
        statistics._pollNanoseconds.bump(UInt64(max(0, elapsed)))
        if timeout == 0 { statistics._pollHits.bump() } else { statistics._pollMisses.bump() }
        if timeout != -1 { timeout -= min(timeout, elapsed) }
        return progress
    }

    func runPollHandlersOnce(now: Int64, _ timeout: inout Int64) -> Bool {
        var progress = false
        var i = 0
        while i < pollHandlers.count {
            // Unretained: a handler removed meanwhile (even by its own poll callback) stays
            // alive in retiredHandlers until the next top-level iteration.
            let handler = Unmanaged.passUnretained(pollHandlers[i])
            i += 1
            let ready = handler._withUnsafeGuaranteedRef { h in
                guard !h.deleted else { return false }
                return h.role == .contextNotifier
                    ? wake.pointee.notified.load(ordering: .relaxed) : h.callbacks.poll!()
            }
            if ready {
                let h = handler.takeUnretainedValue()
                markPollReady(h)
                timeout = 0
                h.pollIdleTimeout = now + AdaptivePolling.idleIntervalNs
                if h.role != .contextNotifier { progress = true }
            }
        }
        return progress
    }

    /// QEMU `remove_idle_poll_handlers`: with a backend that sees readiness from user space,
    /// a handler whose poll found nothing for 7 s leaves the poll list.
    func removeIdlePollHandlers(now: Int64, _ timeout: inout Int64) -> Bool {
        guard monitor.supportsUserspacePolling else { return false }
        var progress = false
        var i = 0
        while i < pollHandlers.count {
            if pollHandlers[i].pollIdleTimeout == 0 {
                pollHandlers[i].pollIdleTimeout = now + AdaptivePolling.idleIntervalNs
            } else if now >= pollHandlers[i].pollIdleTimeout {
                let h = pollHandlers[i]
                h.pollIdleTimeout = 0
                pollHandlers.remove(at: i)
                h.inPollList = false
                if pollStarted {
                    h.callbacks.pollEnd?()
                    if pollOnce(h) {
                        markPollReady(h)
                        if h.role != .contextNotifier { progress = true }
                        timeout = 0
                    }
                }
                continue
            }
            i += 1
        }
        return progress
    }

    @inline(__always)
    func pollOnce(_ h: FDHandler) -> Bool {
        h.role == .contextNotifier ? wake.pointee.notified.load(ordering: .relaxed) : (h.callbacks.poll?() ?? false)
    }

    /// QEMU `poll_set_started`: calls poll-begin or poll-end on the handlers in the poll
    /// list. When stopping, polls each once more ("in case poll-end raced with the event");
    /// returns whether that found work.
    func pollSetStarted(_ started: Bool) -> Bool {
        guard started != pollStarted else { return false }
        pollStarted = started
        var progress = false
        var i = 0
        while i < pollHandlers.count {
            let h = pollHandlers[i]
            i += 1
            guard !h.deleted else { continue }
            if started {
                h.callbacks.pollBegin?()
            } else {
                h.callbacks.pollEnd?()
                if pollOnce(h) {
                    markPollReady(h)
                    if h.role != .contextNotifier { progress = true }
                }
            }
        }
        return progress
    }

    // MARK: - Dispatch

    func dispatchReadyHandlers(blockNs: Int64, _ params: PollParameters) -> Bool {
        var progress = false
        while readyHead < readyHandlers.count {
            // Unretained: a handler is alive while registered, and a removed one stays in
            // retiredHandlers until the next top-level iteration.
            let handler = Unmanaged.passUnretained(readyHandlers[readyHead])
            readyHead += 1
            progress = handler._withUnsafeGuaranteedRef { h in
                let ran = dispatch(h)
                if params.maxNs != 0 && h.inPollList && !h.deleted {
                    let window = AdaptivePolling.adjust(current: h.pollNs, blockNs: blockNs, params)
                    if window != h.pollNs {
                        h.pollNs = window
                        statistics.publishPollWindow(fd: h.fd, ns: window)
                    }
                }
                return ran
            } || progress
        }
        if readyHead == readyHandlers.count && readyHead > 0 {
            readyHandlers.removeAll(keepingCapacity: true)
            readyHead = 0
        }
        return progress
    }

    /// QEMU `aio_dispatch_handler`.
    func dispatch(_ h: FDHandler) -> Bool {
        let revents = h.revents
        let pollReady = h.pollReadyFlag
        h.revents = 0
        h.pollReadyFlag = false
        h.onReadyList = false
        guard !h.deleted else { return false }

        // A handler that fired joins the poll list: activity is likely to continue.
        if !h.inPollList && h.callbacks.poll != nil {
            h.inPollList = true
            pollHandlers.append(h)
            if pollStarted { h.callbacks.pollBegin?() }
        }

        if pollReady && revents == 0, let ready = h.callbacks.pollReady {
            if h.role == .contextNotifier { return false }
            // Out of the poll list while it runs, so a nested poll does not re-enter it
            // before it cleared its condition (QEMU test-nested-aio-poll).
            let wasInList = h.inPollList
            if wasInList { removeFromPollList(h) }
            statistics._handlerDispatches.bump()
            ready()
            if wasInList && !h.inPollList && !h.deleted {
                h.inPollList = true
                pollHandlers.append(h)
            }
            return true
        }

        var progress = false
        if revents & (0x001 | 0x010 | 0x008) != 0 {  // IN | HUP | ERR
            switch h.role {
            case .contextNotifier:
                if notifier.testAndClear() { statistics._notifierWakeups.bump() }
            case .eventNotifier:
                // The loop clears the notifier, so a kick must reach a callback: `read`, or for
                // a notifier registered with poll callbacks only, `pollReady` (the work the kick
                // stands for). QEMU does not watch such a notifier's fd at all.
                // Two `if let`s, not `read ?? pollReady`: `??` on optional closures builds a new
                // closure, an allocation per dispatch (make bench-gate's W3 polling-off row).
                if h.notifier!.testAndClear() {
                    if let read = h.callbacks.read {
                        statistics._handlerDispatches.bump()
                        read()
                        progress = true
                    } else if let ready = h.callbacks.pollReady {
                        statistics._handlerDispatches.bump()
                        ready()
                        progress = true
                    }
                }
            case .fd:
                if let read = h.callbacks.read {
                    statistics._handlerDispatches.bump()
                    read()
                    progress = true
                }
            }
        }
        if revents & (0x004 | 0x008) != 0, !h.deleted, let write = h.callbacks.write {  // OUT | ERR
            statistics._handlerDispatches.bump()
            write()
            progress = true
        }
        return progress
    }
}
