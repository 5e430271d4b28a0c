"""Herald's whole-pipeline benchmark: `./scripts/bench --help`.

`run` orchestrates one run and its drain; `load` sets up users and rooms and posts the messages
(aiohttp); `fakes` are the lean local FCM and SMTP servers; `services` starts the four services'
console scripts; `monitor` samples CPU, memory and queue depths and lists the vhost's queues;
`calibrate` times a fixed Python loop and a raw aio-pika loop; `checker` decides which
notifications completed and which are lost, not drained or duplicated; `report` prints the table
and writes the JSON and PNG; `compare` runs a git ref's services and the working tree's back to
back; `profile` drives and summarises py-spy.
"""
