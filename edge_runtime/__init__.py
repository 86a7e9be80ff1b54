"""The aggregator service that runs on the edge box. Never imports torch or train/."""
