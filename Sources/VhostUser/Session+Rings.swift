// The rings of a Session: each ring's lifecycle (stopped -> starting -> running -> stopping),
// driven by reconcile() on the session's thread through QueueBinding; the quiesce primitive
// that holds rings stopped while a message's change is applied; a move of the session and its
// queues to other IOThreads; and the disconnect. See Session.swift's design note.
import Aio
import Devices
import Glibc

extension Session {
    // MARK: - Starting and stopping rings

    /// Applies a change to a ring's configuration, stopping it first if it runs.
    func reconfigure(_ v: Vring, _ m: VhostUserMessage, _ change: @escaping () -> Void) -> Outcome {
        guard v.state != .stopped else {
            change()
            do throws(VhostUserProtocolError) { try reconcile(v) } catch { disconnect(error.message) }
            return .ack
        }
        quiesce([v]) { [self] in
            change()
            ack(m, 0)
        }
        return .later
    }

    /// Whether the ring's queue should run now.
    func shouldRun(_ v: Vring) -> Bool {
        v.started && v.enabled && memory != nil && !closed && v.holds == 0
    }

    /// Moves the ring one transition towards what it should be: starts its queue if it
    /// should run and is stopped, stops it if it should not and runs or is starting. A ring
    /// that is stopping, or starting and should run, is left alone: the transition reports
    /// back and reconciles again.
    func reconcile(_ v: Vring) throws(VhostUserProtocolError) {
        switch (v.state, shouldRun(v)) {
        case (.stopped, true):
            guard v.size > 0, v.hasAddresses, let kick = v.kick, let memory else {
                throw VhostUserProtocolError("queue \(v.index) started before its size and addresses were set")
            }
            let ring: SplitRing
            do {
                ring = try SplitRing(memory: memory, layout: SplitRingLayout(size: v.size, descAddr: v.descAddr,
                                                                             availAddr: v.availAddr, usedAddr: v.usedAddr),
                                     in: .frontEnd)
            } catch {
                throw VhostUserProtocolError("Invalid vring_addr message: \(error.message)")
            }
            let q = DeviceQueue(index: v.index, ring: ring, memory: memory, backend: export.backend, serial: export.serial,
                                kick: kick, interrupt: v.call, lastAvail: v.base, usedIdx: ring.usedIdx, name: export.id)
            q.writeThrough = !writeCache
            let binding = QueueBinding(q)
            v.binding = binding
            v.state = .starting
            export.publish(queue: v.index, q.statistics)
            // Strong self: the report may be what keeps the session alive until it ran.
            // The reports run on the session's thread; they name the ring by index (a Vring is
            // not Sendable) and hold the session strongly until they ran.
            let index = v.index
            binding.relocate(to: v.queueContext, reportingOn: ctx) { [self] _ in started(vrings[index]) }
        case (.running, false), (.starting, false):
            // A starting queue may be stopped at once: its attach is already scheduled where
            // the stop will run, after it (QueueBinding).
            v.state = .stopping
            let index = v.index
            v.binding!.relocate(to: nil, reportingOn: ctx) { [self] r in stopped(vrings[index], lastAvail: r.lastAvail) }
        default:
            break
        }
    }

    /// The ring's queue runs on its IOThread. Session thread.
    func started(_ v: Vring) {
        guard v.state == .starting else { return }  // stopped again meanwhile: `stopped` follows
        v.state = .running
        reconcileOrDisconnect(v)  // it may have been disabled, or held, meanwhile
    }

    /// The ring's queue drained and let go of its IOThread. Session thread.
    func stopped(_ v: Vring, lastAvail: UInt16) {
        guard let b = v.binding else { return }
        v.base = lastAvail
        v.binding = nil
        v.state = .stopped
        export.retire(queue: v.index, b.queue.statistics)
        let w = v.waiters
        v.waiters = []
        guard !w.isEmpty else {
            reconcileOrDisconnect(v)  // it may have been enabled again meanwhile (ENABLE 0 then 1)
            return
        }
        // Waiters belong to quiesces that hold this ring (their release reconciles it). The last
        // may be a move's, which hands the session to another thread: after it, this thread
        // must not touch the session, so nothing follows the waiters here.
        for body in w { body() }
    }

    func reconcileOrDisconnect(_ v: Vring) {
        do throws(VhostUserProtocolError) { try reconcile(v) } catch { disconnect(error.message) }
    }

    /// Holds the rings of `rings` stopped and the socket unread, and runs `body` once none of
    /// them is running, starting or stopping; then lets them go and reads on. Quiesces nest.
    func quiesce(_ rings: [Vring], _ body: @escaping () -> Void) {
        hold(rings) { [self] in
            body()
            release(rings)
        }
    }

    /// The first half of a quiesce: stops reading, holds `rings` stopped, and runs `body`
    /// once all of them are. The quiesce lasts until `release` (which `body` may leave to
    /// another thread: a move hands the session over first).
    func hold(_ rings: [Vring], _ body: @escaping () -> Void) {
        pause()
        for v in rings { v.holds += 1 }
        let busy = rings.filter { $0.state != .stopped }
        if busy.isEmpty { return body() }
        final class Countdown { var left: Int; init(_ n: Int) { left = n } }
        let countdown = Countdown(busy.count)
        for v in busy {
            v.waiters.append {
                countdown.left -= 1
                if countdown.left == 0 { body() }
            }
            reconcileOrDisconnect(v)  // a running or starting ring starts to stop
        }
    }

    /// Ends a quiesce: the rings may run again and the socket is read once no quiesce is left.
    func release(_ rings: [Vring]) {
        for v in rings { v.holds -= 1 }
        resume()
        guard !closed else { return }
        for v in rings { reconcileOrDisconnect(v) }
    }

    func pause() {
        pauses += 1
        if pauses == 1 && !closed { ctx.removeFDHandler(fd) }
    }

    func resume() {
        pauses -= 1
        guard pauses == 0, !closed else { return }
        watch()  // level-triggered: a message already waiting is read at once
    }

    // MARK: - Moving to other IOThreads

    /// Moves the session, and every ring's queue, to `home` and `queueContexts`: quiesces
    /// every ring, runs `handOff` (still here: the export's own home state moves with it),
    /// hands the session to `home` (the old home's last act), and there reads on and restarts
    /// the rings; then calls `done` on `home`. A disconnect meanwhile waits for the move to end.
    /// Session thread.
    func move(home: AioContext, queueContexts: [AioContext], handOff: @escaping () -> Void,
              _ done: @escaping @Sendable () -> Void) {
        precondition(!closed && !moving, "BUG DETECTED: a closed or moving session was moved")
        moving = true
        let rings = vrings
        hold(rings) { [self] in
            // Every ring is stopped and the socket's handler is off (pause removed it): nothing
            // of the session is left on the old home.
            for v in vrings { v.queueContext = queueContexts[v.index] }
            ctx = home
            handOff()
            home.scheduleOneShot(name: "\(export.id)-moved") { [self] in
                moving = false
                release(vrings)
                done()
                if let reason = closeAfterMove {
                    closeAfterMove = nil
                    disconnect(reason)
                }
            }
        }
    }

    // MARK: - Disconnect

    /// Ends the session: stops reading, drains every queue, then unmaps guest memory, closes
    /// every fd and calls `onClosed`. Idempotent. During a move, it happens once the move
    /// has ended, on the new home.
    func disconnect(_ reason: String) {
        guard !closed else { return }
        if moving {
            if closeAfterMove == nil { closeAfterMove = reason }
            return
        }
        export.recordError(reason)
        closed = true
        export.sessionEnding()
        ctx.removeFDHandler(fd)
        close(fd)
        tx = []
        let all = vrings
        quiesceForClose(all)
    }

    func quiesceForClose(_ rings: [Vring]) {
        // Held for good: the session never reads again.
        hold(rings) { [self] in
            for v in vrings { v.forgetFDs() }
            memory = nil
            let done = onClosed
            onClosed = nil
            done?()
        }
    }
}
