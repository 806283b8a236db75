"""Lightning callbacks used by `dvlx.fit`."""
