"""Test infrastructure: a real moto S3 server subprocess, a fault-injecting proxy and a latency proxy."""

from .faultproxy import FaultConfig, FaultProxy, s3_error_response
from .latencyproxy import LatencyProxy
from .s3server import S3Server, boto3_s3_client, free_port

__all__ = ["FaultConfig", "FaultProxy", "LatencyProxy", "S3Server", "boto3_s3_client", "free_port",
           "s3_error_response"]
