"""The edge daemon: one device of a fleet, over MQTT.

It wraps the training-side :class:`fedmfs.client.LocalClient` (torch) and drives it from the
coordinator's messages. One thread owns the client and the state directory; paho's thread only
enqueues. Per round: train from the announced globals, score (Shapley with ONNX Runtime), select under
the cap, write the payloads to the state directory, upload them in chunks (QoS 1) with resume, then
publish the report. On new globals: Stage #2 and a new personalised ONNX model set (``model/``),
which ``fedmfs-edge predict`` runs without torch.

State directory (every file written atomically; a restart resumes where it stopped)::

    state.json                 progress: last round reported, last Stage #2, the pending upload
    client/                    LocalClient.save (local models, fusion, upload history)
    globals/<modality>.fmg     the verified signed global frames
    pending/<modality>.bin     the payloads of the round being uploaded
    history.json               per round: Shapley, sizes, priorities, choice, acks, accuracy
    model/                     the personalised ONNX model set (fedmfs.edge.modelset)
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np

from fedmfs.errors import ConfigError, PayloadError
from fedmfs.mqtt import Inbound, MqttLink
from fedmfs.payload import decode_model
from fedmfs.protocol import (
    Ack, AckReason, DeviceConfig, DeviceState, DeviceStatus, Report, RoundAnnouncement, RoundState, TopicKind,
    Topics, Verifier, decode_global, decode_message, encode_message, parse_topic,
)
from fedmfs.sdnotify import Notifier, Watchdog

from .config import EdgeConfig
from .modelset import atomic_write as _atomic_write
from .uploads import UploadStatus, UploadTracker, publish_packet_bytes

__all__ = ["EdgeDaemon"]

log = logging.getLogger("fedmfs.edge")


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)


def _write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class EdgeDaemon:
    def __init__(self, cfg: EdgeConfig, exit_when_done: bool = False, notifier: Notifier | None = None):
        self.cfg = cfg
        self.exit_when_done = exit_when_done
        self.dir = cfg.state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(cfg.fleet)
        self.verifier = Verifier(cfg.coordinator_key)
        self.notifier = notifier or Notifier()
        self.watchdog = Watchdog(self.notifier)
        self.inbox: "queue.Queue[Inbound]" = queue.Queue()
        self.stop_event = threading.Event()
        self.globals: dict[str, tuple[str, dict]] = {}     # modality -> (payload sha256, state)
        self.config: DeviceConfig | None = None
        self.announcement: RoundAnnouncement | None = None
        self.progress = self._load_json("state.json", {"reported": -1, "stage2": -1, "pending": None})
        self.history: dict[str, dict] = self._load_json("history.json", {})
        self.uploads: dict[str, UploadTracker] = {}
        self.report_sent_at: float | None = None
        self.report_attempts = 0
        self.accuracy: float | None = None
        self.wire_bytes = 0     # MQTT PUBLISH bytes of upload chunks this round (this process)
        # fault injection for the restart tests: exit abruptly after publishing this many chunk frames
        self._exit_after_frames = int(os.environ.get("FEDMFS_FAULT_EXIT_AFTER_FRAMES", "0") or 0)
        self._frames_published = 0
        self.finished = False
        self._client = None
        self._load_globals()
        t = self.topics
        status = lambda s: encode_message(DeviceStatus(cfg.device, s))
        self.link = MqttLink(
            cfg.broker, f"fedmfs-edge-{cfg.fleet}-{cfg.device}",
            [(t.round(), 1), (t.global_all(), 1), (t.config(cfg.device), 1), (t.ack(cfg.device), 1)],
            self.inbox, will=(t.status(cfg.device), status(DeviceState.OFFLINE), 1, True), persistent=True,
            on_connected=lambda: self.link.publish(t.status(cfg.device), status(DeviceState.ONLINE), 1, True))

    # -- persistence -------------------------------------------------------------------------------
    def _load_json(self, name: str, default):
        p = self.dir / name
        if not p.exists():
            return default
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"state file {p} is unreadable ({e}); move it away to start this device afresh") from e

    def _save_progress(self) -> None:
        _write_json(self.dir / "state.json", self.progress)

    def _save_history(self) -> None:
        _write_json(self.dir / "history.json", self.history)

    def _load_globals(self) -> None:
        for p in sorted((self.dir / "globals").glob("*.fmg")):
            try:
                self._accept_global(p.read_bytes(), persist=False)
            except PayloadError as e:
                log.warning("ignoring stored global %s: %s", p, e)

    def _accept_global(self, frame: bytes, persist: bool = True) -> None:
        h, payload = decode_global(frame, self.verifier)
        if h.fleet != self.cfg.fleet:
            raise PayloadError(f"global model of fleet {h.fleet!r}, this device is in {self.cfg.fleet!r}")
        header, st = decode_model(payload)
        if header.modality != h.modality:
            raise PayloadError("global model: payload modality differs from the signed header")
        self.globals[h.modality] = (h.sha256, st)
        if persist:
            atomic_write(self.dir / "globals" / f"{h.modality}.fmg", frame)

    # -- the training side (torch), created lazily --------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self):
        import torch

        from fedmfs.client import LocalClient
        from fedmfs.config import train_config_from
        from fedmfs.coordinator.config import load_spec
        from fedmfs.data.format import load_client

        spec = load_spec(self.cfg.spec)
        data = load_client(self.cfg.data, spec, self.cfg.device)
        train = train_config_from(self.cfg.train, f"{self.cfg.device} [train]")
        torch.set_num_threads(train.threads)
        c = LocalClient(spec, data, train, self.cfg.seed, self.cfg.index)
        if (self.dir / "client" / "client.json").exists():
            c.restore(self.dir / "client", self._deploy_states())
        return c

    def _deploy_states(self) -> dict:
        ann = self.announcement
        return {m: st for m, (sha, st) in self.globals.items() if ann is None or ann.globals.get(m) == sha}

    def _selector(self):
        from fedmfs.engine import SimConfig, make_selector
        from fedmfs.selection import Alphas

        c = self.config
        return make_selector(SimConfig(method=c.method, alphas=Alphas(c.alpha_s, c.alpha_c, c.alpha_r)))

    # -- message handling --------------------------------------------------------------------------
    def _on_message(self, msg: Inbound) -> None:
        try:
            t = parse_topic(msg.topic)
        except PayloadError as e:
            log.info("ignoring %r: %s", msg.topic, e)
            return
        if not msg.payload:
            return   # a cleared retained message
        try:
            if t.kind is TopicKind.GLOBAL:
                self._accept_global(msg.payload)
            elif t.kind is TopicKind.ROUND:
                self.announcement = decode_message(msg.payload, RoundAnnouncement)
            elif t.kind is TopicKind.CONFIG and t.device == self.cfg.device:
                self.config = decode_message(msg.payload, DeviceConfig)
            elif t.kind is TopicKind.ACK and t.device == self.cfg.device:
                self._on_ack(decode_message(msg.payload, Ack))
        except PayloadError as e:   # refused, logged, and life goes on
            log.warning("refused a %s message: %s", t.kind.value, e)
        except OSError as e:        # disk trouble: keep serving, the retained message comes again
            log.error("could not store a %s message: %s", t.kind.value, e)

    def _on_ack(self, ack: Ack) -> None:
        pending = self.progress.get("pending")
        if pending is None or ack.round != pending["round"]:
            return
        if ack.modality is None:
            if ack.reason in (AckReason.REPORT_ACCEPTED, AckReason.ROUND_CLOSED):
                self._finish_round(pending["round"])
            return
        up = self.uploads.get(ack.modality)
        if up is None:
            return
        self._publish_frames(up, up.on_ack(ack, time.time()), pending["round"])
        if up.done:
            pending["status"][up.modality] = up.reason.value if up.reason else up.status.value
            self._save_progress()

    def _publish_frames(self, up: UploadTracker, frames: list[bytes], round_index: int) -> None:
        topic = self.topics.upload(self.cfg.device, round_index, up.modality)
        v5 = self.link.protocol_used == "5"
        for f in frames:
            self.link.publish(topic, f, 1, False)
            self.wire_bytes += publish_packet_bytes(topic, len(f), 1, v5)
            self._frames_published += 1
            if self._exit_after_frames and self._frames_published >= self._exit_after_frames:
                log.error("fault injection: exiting after %d chunk frames", self._frames_published)
                time.sleep(0.2)
                os._exit(17)

    # -- the round ---------------------------------------------------------------------------------
    def _have_globals(self, ann: RoundAnnouncement) -> bool:
        return all(self.globals.get(m, ("",))[0] == sha for m, sha in ann.globals.items())

    def step(self, now: float) -> None:
        """Advance whatever can advance: Stage #2, a new round, uploads, the report."""
        ann = self.announcement
        if ann is None or self.config is None or ann.fleet != self.cfg.fleet:
            return
        if not self._have_globals(ann):
            return   # the retained globals of this round are on their way
        pending = self.progress.get("pending")
        if pending is not None and (pending["round"] != ann.round or ann.state is not RoundState.OPEN):
            log.info("round %d closed before this device finished it", pending["round"])
            self._finish_round(pending["round"])
            pending = None
        last_closed = ann.round - 1 if ann.state is RoundState.OPEN else ann.round
        if ann.state is not RoundState.OPEN and ann.state is not RoundState.DONE:
            return
        if self.progress["stage2"] < last_closed and last_closed >= 0 and (ann.state is RoundState.DONE or ann.round > 0):
            self._stage2(last_closed)
        if ann.state is RoundState.DONE:
            self.finished = True
            return
        if pending is None and self.progress["reported"] < ann.round:
            self._train_round(ann, now)
            pending = self.progress["pending"]
        if pending is not None:
            self._drive_uploads(pending, now)

    def _stage2(self, round_index: int) -> None:
        c = self.client
        deploy = self._deploy_states()
        c.stage2(deploy, round_index)
        acc = c.evaluate()
        self.accuracy = acc
        self.history.setdefault(str(round_index), {})["accuracy"] = acc
        self._export_model(round_index)
        c.save(self.dir / "client")
        self.progress["stage2"] = round_index
        self._save_history()
        self._save_progress()
        log.info("stage 2 after round %d: accuracy %.4f on %d test windows", round_index, acc, int((~c.data.train).sum()))

    def _export_model(self, round_index: int) -> None:
        try:
            from fedmfs.export.builder import model_set_onnx
        except ImportError as e:   # an inference-only install cannot export
            log.warning("no personalised ONNX model (export needs onnx): %s", e)
            return
        from .modelset import write_model_set

        mods, fusion = self.client.personalised_states()
        models, fusion_onnx, coal = model_set_onnx(self.client.spec, mods, fusion, self.client.config.fusion_hidden)
        write_model_set(self.dir / "model", self.client.spec, models, fusion_onnx, coal,
                        versions={**{m: round_index for m in models}, "fusion": round_index,
                                  "coalitions": round_index})

    def _train_round(self, ann: RoundAnnouncement, now: float) -> None:
        c, cfg = self.client, self.config
        r = ann.round
        self._merge_spool()
        start = {m: st for m, (sha, st) in self.globals.items() if m in ann.globals}
        t0 = time.perf_counter()
        upd = c.local_round(r, start)
        gamma = len(c.spec.names) if cfg.method == "all" else cfg.gamma
        choice = c.choose(upd, self._selector(), gamma, cfg.cap_bytes, r)
        c.mark_uploaded(choice.modalities, r)
        for m in choice.modalities:
            atomic_write(self.dir / "pending" / f"{m}.bin", c.payload(upd, m, r))
        c.save(self.dir / "client")
        self.history.setdefault(str(r), {}).update({
            "shapley": upd.shapley, "sizes": upd.sizes, "priorities": choice.priorities,
            "choice": list(choice.modalities), "stage1_accuracy": upd.stage1_accuracy, "samples": upd.samples,
            "train_seconds": time.perf_counter() - t0})
        self._save_history()
        self.progress["pending"] = {"round": r, "chosen": list(choice.modalities), "status": {},
                                    "chunk_bytes": ann.chunk_bytes}
        self._save_progress()
        log.info("round %d: trained in %.1f s, uploading %s", r, time.perf_counter() - t0,
                 ", ".join(choice.modalities) or "nothing")

    def _drive_uploads(self, pending: dict, now: float) -> None:
        r = pending["round"]
        for m in pending["chosen"]:
            if m in pending["status"] or m in self.uploads:
                continue
            payload = (self.dir / "pending" / f"{m}.bin").read_bytes()
            up = UploadTracker(m, payload, pending["chunk_bytes"], self.cfg.ack_timeout, self.cfg.max_attempts)
            self.uploads[m] = up
            # after a restart the coordinator may hold part of it: probe first, resend what it lacks
            self._publish_frames(up, up.start(now, resume=pending.get("started", {}).get(m, False)), r)
            pending.setdefault("started", {})[m] = True
            self._save_progress()
        for up in self.uploads.values():
            self._publish_frames(up, up.on_tick(now), r)
            if up.done and up.modality not in pending["status"]:
                pending["status"][up.modality] = up.reason.value if up.reason else up.status.value
                self._save_progress()
        if all(m in pending["status"] for m in pending["chosen"]):
            self._send_report(pending, now)

    def _send_report(self, pending: dict, now: float) -> None:
        if self.report_sent_at is not None and now - self.report_sent_at < self.cfg.ack_timeout:
            return
        if self.report_attempts >= self.cfg.max_attempts:
            log.error("round %d: no answer to the report after %d attempts", pending["round"], self.report_attempts)
            self._finish_round(pending["round"])
            return
        r = pending["round"]
        h = self.history.get(str(r), {})
        accepted = tuple(m for m in pending["chosen"] if pending["status"].get(m) == AckReason.ACCEPTED.value)
        sizes = {m: int(v) for m, v in h.get("sizes", {}).items()}
        rep = Report(self.cfg.device, r, int(h.get("samples", 0)), h.get("shapley", {}), h.get("priorities", {}),
                     sizes, tuple(pending["chosen"]), accepted, sum(sizes.get(m, 0) for m in accepted),
                     self.accuracy)
        self.link.publish(self.topics.report(self.cfg.device), encode_message(rep), 1, False)
        self.report_sent_at = now
        self.report_attempts += 1

    def _finish_round(self, r: int) -> None:
        pending = self.progress.get("pending") or {}
        h = self.history.setdefault(str(r), {})
        h["acks"] = dict(pending.get("status", {}))
        h["wire_bytes"] = h.get("wire_bytes", 0) + self.wire_bytes
        h["payload_bytes_sent"] = sum(up.frame_bytes_sent for up in self.uploads.values())
        self.wire_bytes = 0
        self.progress["reported"] = max(self.progress["reported"], r)
        self.progress["pending"] = None
        self._save_history()
        self._save_progress()
        for p in (self.dir / "pending").glob("*.bin"):
            p.unlink()
        self.uploads.clear()
        self.report_sent_at = None
        self.report_attempts = 0

    def _merge_spool(self) -> None:
        """New labelled windows (``*.npz`` in the client-file format) join the local data."""
        sp = self.cfg.spool
        if sp is None or not sp.is_dir():
            return
        files = sorted(sp.glob("*.npz"))
        if not files:
            return
        from fedmfs.data.format import ClientData, load_client

        c = self.client
        xs, ys, trains = {m: [v] for m, v in c.data.x.items()}, [c.data.y], [c.data.train]
        done = sp / "merged"
        done.mkdir(exist_ok=True)
        for f in files:
            try:
                extra = load_client(f, c.spec, c.data.name)
                if set(extra.x) != set(c.data.x):
                    raise PayloadError(f"has modalities {sorted(extra.x)}, the device has {sorted(c.data.x)}")
            except Exception as e:   # a bad spool file is set aside, never fatal
                log.warning("spool file %s refused: %s", f, e)
                f.rename(sp / (f.name + ".refused"))
                continue
            for m in xs:
                xs[m].append(extra.x[m])
            ys.append(extra.y)
            trains.append(extra.train)
            f.rename(done / f.name)
        data = ClientData(c.data.name, {m: np.concatenate(v) for m, v in xs.items()}, np.concatenate(ys),
                          np.concatenate(trains))
        c.save(self.dir / "client")
        from fedmfs.client import LocalClient
        n = LocalClient(c.spec, data, c.config, c.seed, c.index)
        n.restore(self.dir / "client", self._deploy_states())
        self._client = n
        log.info("merged %d spool files: %d windows now", len(files), len(data))

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, connect_timeout: float = 60.0) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        self.link.start(timeout=connect_timeout)
        self.notifier.ready(f"device {self.cfg.device} connected")
        try:
            while not self.stop_event.is_set():
                self.watchdog.beat("main")
                self.watchdog.maybe_ping()
                try:
                    msg = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    msg = None
                while msg is not None:
                    self._on_message(msg)
                    try:
                        msg = self.inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                try:
                    self.step(time.time())
                except (PayloadError, ValueError, OSError) as e:
                    log.exception("round step failed (will retry): %s", e)
                    time.sleep(1.0)
                if self.finished and self.exit_when_done:
                    break
        finally:
            self.notifier.stopping()
            try:
                self.link.publish(self.topics.status(self.cfg.device),
                                  encode_message(DeviceStatus(self.cfg.device, DeviceState.OFFLINE)), 1, True,
                                  timeout=2.0)
            except Exception:  # best effort on the way out
                pass
            self.link.stop()
        return 0
