"""Physics scenarios and recording replays that feed the node firmware (see base.py)."""
