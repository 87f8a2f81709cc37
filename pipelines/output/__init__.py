"""The output room: the output root, typed records, the commit protocol, lock, verify, status, report, reader."""
