"""Fault tests: Herald's guarantees (nothing lost, nothing recorded twice, at most one duplicate
push or e-mail per crash, poison parked with a reason) while processes, the broker and a database
fail under traffic.

Nothing here touches the machine's RabbitMQ (5672) or PostgreSQL (5432). `tests/support/faults.py`
starts servers of its own, on spare loopback ports, from temporary directories it deletes:

* `RabbitNode`: `rabbitmq-server` from /usr/lib/rabbitmq/bin (`HERALD_FAULT_RABBITMQ_BIN`) run
  directly, not through the /usr/sbin wrapper that switches to the machine node's user and
  settings, with its own `RABBITMQ_NODENAME` (`herald-fault-<random>@localhost`),
  `RABBITMQ_NODE_PORT` and `RABBITMQ_DIST_PORT` (loopback only), data and log directories, config
  file (`listeners.tcp.1`), empty enabled-plugins file, empty `RABBITMQ_CONF_ENV_FILE` (so
  /etc/rabbitmq/rabbitmq-env.conf does not apply) and its own Erlang cookie (`HOME` points at the
  temporary directory). Only epmd is shared: the node registers its unique name there. Started in
  its own process group and awaited with `rabbitmqctl wait <pidfile>`; a boot takes 5 to 6 s on the
  2-core CI machine (first boot and restarts alike). `stop()` is `rabbitmqctl stop`, `start()`
  boots again on the same data (durable queues, persistent messages survive), `kill()` SIGKILLs
  the process group, `close_all_connections()` is `rabbitmqctl close_all_connections --global`.
  One node per session; every test gets a virtual host of its own. `RabbitCluster` makes several
  such nodes one cluster (a shared Erlang cookie; the first booted, the others booted and joined
  with `join_cluster`; each with `cluster_partition_handling = pause_minority`; the session
  fixture `rabbit_cluster`): `test_cluster.py` forms one of three (15-69 s on the loaded 2-core
  machine), applies deploy/rabbitmq/definitions.json (every quorum queue gets three replicas),
  SIGKILLs the node a client uses, and runs Herald on it (`start_herald(rabbit=rabbit_cluster)`:
  every process gets the three addresses, `first_nodes=` chooses each one's first;
  `Herald.connected_nodes` reads from /proc which node each process is connected to) through the
  loss of the node leading most quorum queues, two replicas of each service spread over the
  nodes, and through a partition that cuts the node all its services use off the other two
  (`RabbitCluster.cut_off`: the cut node's cookies for the others made wrong and its links
  dropped, so both sides see the other down at once and `rabbitmqctl` still reaches it; `heal`).
* `PostgresCluster`: `initdb` (/usr/lib/postgresql/<newest>/bin, `HERALD_FAULT_PG_BIN`) into a
  temporary directory owned by `postgres`, run through `runuser -u postgres` when the tests run as
  root (initdb and postgres refuse root), trust authentication, `pg_ctl start` on a spare port with
  its socket in that directory, `fsync=off` (only an OS crash could lose data, and none is
  simulated), `max_connections=400` for the services' pools. initdb ≈ 0.4 s, start ≈ 0.1 s. One
  cluster per session with fresh databases per test; the database-outage tests give the router a
  cluster of its own (`router_cluster`) so that stopping it takes nothing else away.

`start_herald` (tests/fault/conftest.py) runs the four console scripts as processes
(`tests.support.processes.ServiceProcess`) on them, against `FakeFcm` (recording every attempt:
`RecordingFcm`) and `FakeSmtp`, with retry tiers of 0.2, 0.5 and 1 s, a 5 s heartbeat and an outbox
relay that backs off at most 2 s; `SHORT_LEASES` explains the settings of the tests in which a
sender loses a job mid-flight. `replicas={"push-sender": 2}` starts more than one process of a
service (`push-sender#2`, …, on the same databases and virtual host), and `Herald.kill_owner_of`
SIGKILLs the replica whose connection a fake provider's `on_accept_from` hook saw (its local
port, found in /proc). Everything is stopped and removed in finalisers, and an `atexit`
hook removes any server still alive if a run is interrupted.

The checker: what the API accepted (message ids and their recipients) gives the ledger rows, the
pushes (one per recipient device) and the e-mails (one per recipient) Herald owes, by their
deterministic notification ids; `settle` waits until the pipeline is idle (outbox published, no
message in any work or wait queue — counted with passive declares, because `rabbitmqctl
list_queues` reports a quorum queue's figures up to 5 s late — and nothing changing for 1.5 s),
then compares with the router's ledger, `FakeFcm.accepted` (by Android tag) and `FakeSmtp.received`
(by Message-ID) and counts the dead letters per DLQ. Every test prints one line starting with
`FAULT ` (events, lost, duplicates, dead letters, time to recover, duration) past pytest's capture,
so the figures show in CI's default output; `FAULT harness` lines give the servers' boot times.

The tests are marked `e2e` (they run the services as processes): `-m "not e2e"` leaves them out.
"""
