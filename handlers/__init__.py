"""Tornado handlers; each module exports `routes`, joined in `handlers.routes`."""
