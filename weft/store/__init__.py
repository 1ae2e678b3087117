"""Everything JetStream: the event store, group commit, snapshots, leases, the connection, the
embedded nats-server, and the read model the streams feed."""
