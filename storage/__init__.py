"""Every byte that touches disk: run layout, document tables, token shards, manifests."""
