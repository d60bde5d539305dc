"""MQTT rounds benchmark: 100 light devices over Mosquitto on loopback against the real coordinator.

Light devices skip training: each sends one pre-built modality payload per round through the real
protocol (chunk frames, QoS 1, acks, report), several devices per worker process. Measured:

* coordinator time per round beyond waiting for uploads: the time the coordinator's thread spends
  handling events (decode, verify, aggregate, persist, publish) and the close latency (last report ->
  next round announced);
* wire bytes / payload bytes: MQTT PUBLISH bytes of all chunk frames over the payload bytes;
* upload throughput, end to end: payload bytes / (first chunk published -> last ``accepted`` ack
  received), so it includes the broker's relay to the coordinator, its verify/aggregate/commit (fsync)
  and the ack's trip back; against, from the same processes with the same frames in the same run:
  - raw publish: paho -> Mosquitto QoS 1 PUBACKs, nobody subscribed (the issue's reference figure);
  - raw relay: paho -> Mosquitto -> one bare paho QoS 1 subscriber in the coordinator's process
    (the same path minus the coordinator's work and the acks: the ceiling for this transport).
  Each raw phase is run three times and the median is reported (one phase lasts ~15 ms).

Rerun: python bench/round.py --devices 100 --workers 4 --rounds 3   (needs /usr/sbin/mosquitto)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FLEET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(hidden: int):
    from fedmfs.core.modality import DatasetSpec, ModalitySpec
    return DatasetSpec((ModalitySpec("eye", (2,), hidden), ModalitySpec("emg", (8,), hidden)), 20, 20)


def _worker(idx, devices, port, hidden, rounds, chunk, ctl, res):
    """Devices of one process: a raw-throughput phase, then ``rounds`` protocol rounds."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedmfs.coordinator.machine import modality_shapes
    from fedmfs.core.payload import ModelHeader, encode_model
    from fedmfs.core.records import RoundRecord
    from fedmfs.core.wire import (
        Ack,
        AckReason,
        Report,
        RoundAnnouncement,
        RoundState,
        Topics,
        decode_message,
        encode_message,
        split_payload,
    )

    spec = _spec(hidden)
    t = Topics(FLEET)
    inbox: queue.Queue = queue.Queue()
    clients = {}
    for d in devices:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{d}", protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(100)
        c.on_message = lambda cl, u, m, d=d: inbox.put((d, m.topic, bytes(m.payload)))
        c.connect("127.0.0.1", port)
        c.subscribe([(t.ack(d), 1), (t.round(), 1)])
        c.loop_start()
        clients[d] = c
    rng = np.random.default_rng(idx)
    states = {d: {k: rng.standard_normal(s).astype(np.float32)
                  for k, s in modality_shapes(spec["eye"], spec.num_classes).items()} for d in devices}
    payload0 = encode_model(states[devices[0]], ModelHeader(0, "eye", 10))
    # raw phases: the same number of bytes in the same chunk sizes, plain QoS 1 publishes, to a topic
    # nobody subscribes ("raw") or one the bench's bare subscriber reads ("relay")
    frames = split_payload(payload0, chunk)
    while True:
        kind = ctl.get()
        if kind == "rounds":
            break
        t0 = time.perf_counter()
        infos = [clients[d].publish(f"bench/{kind}/{d}", f, 1) for d in devices for f in frames]
        for i in infos:
            i.wait_for_publish(60)
        res.put((kind, idx, t0, time.perf_counter(), sum(len(f) for f in frames) * len(devices)))
    for r in range(rounds):
        ann = None
        while ann is None or ann.round != r or ann.state is not RoundState.OPEN:
            d, topic, p = inbox.get(timeout=120)
            if topic == t.round() and p:
                ann = decode_message(p, RoundAnnouncement)
        payloads = {d: encode_model(states[d], ModelHeader(r, "eye", 10 + i)) for i, d in enumerate(devices)}
        t_first = time.perf_counter()
        sent = 0
        for d in devices:
            for f in split_payload(payloads[d], ann.chunk_bytes):
                clients[d].publish(t.upload(d, r, "eye"), f, 1)
                sent += len(f)
        waiting = set(devices)
        while waiting:
            d, topic, p = inbox.get(timeout=120)
            if topic.endswith("/ack"):
                a = decode_message(p, Ack)
                if a.round == r and a.modality == "eye" and a.reason.final:
                    assert a.reason is AckReason.ACCEPTED, a
                    waiting.discard(d)
        t_last = time.perf_counter()
        for d in devices:
            rec = RoundRecord(d, r, 10, {"eye": 1.0}, {"eye": len(payloads[d])}, {"eye": 1.0}, ("eye",))
            rep = Report(rec, ("eye",), len(payloads[d]))
            clients[d].publish(t.report(d), encode_message(rep), 1)
        res.put(("round", idx, r, t_first, t_last, sum(len(p) for p in payloads.values()), sent,
                 sum(len(f) for d in devices for f in split_payload(payloads[d], ann.chunk_bytes)),
                 sum(len(split_payload(payloads[d], ann.chunk_bytes)) for d in devices), time.time()))
    for c in clients.values():
        c.loop_stop()
        c.disconnect()


class _RelaySink:
    """A bare paho QoS 1 subscriber on ``bench/relay/#`` (what the coordinator would be with no work)."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        self.cond = threading.Condition()
        self.nbytes, self.last = 0, 0.0
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-relay-sink", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("bench/relay/#", 1)
        self.c.loop_start()
        time.sleep(0.5)

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.nbytes += len(msg.payload)
            self.last = time.perf_counter()
            self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.nbytes = 0

    def wait(self, nbytes: int, timeout: float) -> float:
        """perf_counter time the last of ``nbytes`` arrived."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.nbytes >= nbytes, timeout):
                raise TimeoutError(f"relay sink got {self.nbytes} of {nbytes} bytes")
            return self.last

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=32, help="LSTM hidden size of the light models")
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from fedmfs.coordinator.config import load_coordinator_config
    from fedmfs.coordinator.service import CoordinatorService
    from fedmfs.core.wire import RoundState, Topics, generate_keypair
    from fedmfs.edge.uploads import publish_packet_bytes

    work = Path(tempfile.mkdtemp(prefix="fedmfs-bench-"))
    port = _free_port()
    (work / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
                                 "max_inflight_messages 100\n")
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(work / "m.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    devs = [f"d{i:03d}" for i in range(args.devices)]
    priv, _ = generate_keypair()
    (work / "key").write_text(priv)
    (work / "spec.json").write_text(json.dumps(_spec(args.hidden).to_dict()))
    (work / "fleet.toml").write_text("[defaults]\ngamma = 1\n" + "".join(f'[[device]]\nid = "{d}"\n' for d in devs))
    (work / "c.toml").write_text(
        f'fleet = "{FLEET}"\nstate_dir = "state"\nspec = "spec.json"\nfleet_file = "fleet.toml"\nsigning_key = "key"\n'
        f"[rounds]\ntotal = {args.rounds}\nseconds = 600\nquorum = {args.devices}\nchunk_bytes = {args.chunk}\n"
        f"[broker]\nhost = \"127.0.0.1\"\nport = {port}\n")
    ctx = mp.get_context("spawn")
    res = ctx.Queue()
    ctls = [ctx.Queue() for _ in range(args.workers)]
    groups = [devs[i::args.workers] for i in range(args.workers)]
    procs = [ctx.Process(target=_worker, args=(i, g, port, args.hidden, args.rounds, args.chunk, ctls[i], res))
             for i, g in enumerate(groups)]
    for p in procs:
        p.start()
    time.sleep(3.0)                                  # workers connected
    sink = _RelaySink(port)
    phases: dict[str, list[float]] = {"raw": [], "relay": []}
    for _ in range(3):
        for kind in ("raw", "relay"):
            sink.reset()
            for c in ctls:
                c.put(kind)
            got = [res.get(timeout=300) for _ in procs]
            nbytes = sum(x[4] for x in got)
            t0 = min(x[2] for x in got)
            # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes
            t1 = max(x[3] for x in got) if kind == "raw" else sink.wait(nbytes, 60)
            phases[kind].append(nbytes / (t1 - t0) / 1e6)
    sink.close()
    for c in ctls:
        c.put("rounds")

    # the coordinator, instrumented: time its machine thread spends handling events and its writer
    # thread persisting + publishing, per round
    services = []
    closes: dict[int, float] = {}

    def coordinator() -> None:
        # the service owns its SQLite connection: create it on the thread that runs it
        svc = CoordinatorService(load_coordinator_config(work / "c.toml"), exit_when_done=True)
        services.append(svc)
        orig = svc.handle_batch

        def timed(events):
            r, st = svc.machine.round, svc.machine.state
            t0 = time.perf_counter()
            orig(events)
            if svc.machine.round != r or (st is RoundState.OPEN and svc.machine.state is not RoundState.OPEN):
                closes[r] = time.perf_counter() - t0
        svc.handle_batch = timed
        svc.run(connect_timeout=30)

    th = threading.Thread(target=coordinator, daemon=True)
    th.start()
    rows = [res.get(timeout=600) for _ in range(args.workers * args.rounds)]
    th.join(300)
    for p in procs:
        p.join(60)
    broker.terminate()
    broker.wait(10)

    svc = services[0]
    raw_mbps, relay_mbps = float(np.median(phases["raw"])), float(np.median(phases["relay"]))
    out = {"devices": args.devices, "workers": args.workers, "rounds": args.rounds, "hidden": args.hidden,
           "chunk_bytes": args.chunk, "raw_MBps": raw_mbps, "raw_MBps_runs": phases["raw"],
           "relay_MBps": relay_mbps, "relay_MBps_runs": phases["relay"], "commits": svc.writer.commits,
           "per_round": []}
    topic_len = len(Topics(FLEET).upload("d000", 0, "eye"))
    for r in range(args.rounds):
        rr = [x for x in rows if x[2] == r]
        payload = sum(x[5] for x in rr)
        frames_bytes = sum(x[7] for x in rr)
        nframes = sum(x[8] for x in rr)
        wire = frames_bytes + nframes * (publish_packet_bytes("x" * topic_len, 0, 1, True))
        secs = max(x[4] for x in rr) - min(x[3] for x in rr)
        out["per_round"].append({
            "round": r, "payload_bytes": payload, "wire_bytes": wire, "wire_over_payload": wire / payload,
            "upload_seconds": secs, "upload_MBps": payload / secs / 1e6,
            "coordinator_handle_seconds": svc.handle_seconds.get(r, 0.0),
            "coordinator_persist_seconds": svc.writer.seconds.get(r, 0.0),
            "close_seconds": closes.get(r, 0.0) + svc.writer.closing_seconds.get(r, 0.0)})
    pr = out["per_round"]
    out["summary"] = {
        "coordinator_handle_seconds_per_round": float(np.mean([x["coordinator_handle_seconds"] for x in pr])),
        "coordinator_persist_seconds_per_round": float(np.mean([x["coordinator_persist_seconds"] for x in pr])),
        "close_seconds_per_round": float(np.mean([x["close_seconds"] for x in pr])),
        "wire_over_payload": float(np.mean([x["wire_over_payload"] for x in pr])),
        "upload_MBps": float(np.mean([x["upload_MBps"] for x in pr])),
        "raw_MBps": raw_mbps,
        "relay_MBps": relay_mbps,
        "upload_vs_raw": float(np.mean([x["upload_MBps"] for x in pr])) / raw_mbps,
        "upload_vs_relay": float(np.mean([x["upload_MBps"] for x in pr])) / relay_mbps,
        "payload_bytes_per_device": pr[0]["payload_bytes"] / args.devices,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
