"""Authentication: JWT issue and verification, the signing secret, roles."""
