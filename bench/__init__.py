"""Herald's whole-pipeline benchmark: `./scripts/bench --help`.

`run` orchestrates one run; `load` sets up users and rooms and posts the messages; `fakes` are
the lean local FCM and SMTP servers; `monitor` samples CPU and queue depths; `checker` decides
which notifications completed and which were lost or duplicated; `report` prints the table and
writes the JSON and PNG; `profile` drives and summarises py-spy.
"""
