"""Names the gateway gives things in the bucket (no heavy imports: the CLI loads this on every run)."""

# Keys under PREFIX/.ckptfs/ belong to the gateway and are hidden from the mount.
PRIVATE_DIR = ".ckptfs"
# Tag the drain puts on every checkpoint object it uploads, and the value `ckptfs promote` sets.
# Lifecycle filters cannot negate a tag, so the expiry rule matches the positive "false" value.
KEEP_TAG = "ckptfs-keep"
UPLOAD_TAGGING = f"{KEEP_TAG}=false"
