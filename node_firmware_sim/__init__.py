"""Sensor-node firmware (sample -> features -> encode -> publish) and its simulated sources."""
