print("dataplane")
