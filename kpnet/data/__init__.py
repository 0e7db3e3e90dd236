"""Data sources, records and the tf.data pipeline."""

from kpnet.data.records import DataError, InstanceRecord

__all__ = ["DataError", "InstanceRecord"]
