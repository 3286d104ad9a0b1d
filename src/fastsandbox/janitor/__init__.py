"""The janitor: finds containers, snapshots, log files and FIFOs with our labels whose sandbox
record or agent is gone, and removes them after an orphan timeout (`janitor.py`; the decision
rules are in `scanner.py`)."""
