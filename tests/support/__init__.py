"""Test infrastructure: a real moto S3 server subprocess and a fault-injecting proxy."""

from .faultproxy import FaultConfig, FaultProxy, s3_error_response
from .s3server import S3Server, boto3_s3_client, free_port

__all__ = ["FaultConfig", "FaultProxy", "S3Server", "boto3_s3_client", "free_port",
           "s3_error_response"]
