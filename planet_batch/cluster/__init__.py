"""The plumbing under every stage: Ray start-up, its console and capacity, signals, fault points; storage URIs."""
