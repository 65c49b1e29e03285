"""One job: its folder (bundle.py, the only module that knows the file names) and its run (run.py)."""
