"""Kafka message schemas that kafka-python's ``kafka.protocol`` does not ship, in its JSON format (the
format of Kafka's own message definitions), loaded by ``codec.py``."""
