"""Wiring: settings, logging, the trade source, the app and its server; runs until SIGTERM.

On SIGTERM/SIGINT the clock stops, every WebSocket client gets close code 1001 (going away), then
the HTTP server shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import uvicorn

from services.simulator.app import create_app
from services.simulator.chain import ChainNode, add_chain_routes
from services.simulator.data_api import use_quirks
from services.simulator.feed import Hub
from services.simulator.gamma import gamma_markets
from services.simulator.history import History
from services.simulator.replay import Emitter
from services.simulator.settings import SimulatorSettings, resolve_path
from services.simulator.synthetic import SyntheticTrades, rate_schedule
from services.simulator.tape import Scheduled, TapeError, load_tape, tape_schedule, with_quirks
from services.simulator.trades import Quirks
from shared.logs import configure_logging, register_secret
from shared.ops import http_server, stop_event
from shared.wallets import WalletFileError, load_wallets

log = logging.getLogger(__name__)

SHUTDOWN_CODE, SHUTDOWN_REASON = 1001, "server shutting down"


class HideWebSocketPath(logging.Filter):
    """Uvicorn logs each WebSocket handshake with its path, and at DEBUG the websockets protocol
    under it logs the request line; Dome keeps the key in the path, polynode in the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not isinstance(record.args, tuple):
            return True
        if '"WebSocket %s"' in record.msg and len(record.args) >= 2:
            record.args = (record.args[0], "/***", *record.args[2:])
        elif record.msg == "< %s %s %s" and len(record.args) == 3:
            record.args = (record.args[0], "/***", record.args[2])
        return True


def hide_websocket_paths() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, HideWebSocketPath) for f in logger.filters):
        logger.addFilter(HideWebSocketPath())


def build_schedule(settings: SimulatorSettings) -> Iterator[Scheduled]:
    if settings.sim_mode == "synthetic":
        wallets = load_wallets(resolve_path(settings.sim_wallets_file))
        trades = SyntheticTrades([w.address for w in wallets], settings.sim_seed)
        return rate_schedule(trades, settings.sim_rate)
    tape = load_tape(resolve_path(settings.sim_tape))
    return tape_schedule(tape, settings.sim_speed, settings.sim_loop)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts so the port is known (port 0 works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it Nagle holds small frames back ~40 ms behind delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Simulator:
    """One running simulator: trade source, clock, history, subscriptions and the HTTP app."""

    def __init__(self, settings: SimulatorSettings) -> None:
        register_secret(settings.sim_api_key.get_secret_value())
        hide_websocket_paths()
        self.settings = settings
        self.history = History(settings.sim_history_max)
        self.hub = Hub(
            settings.sim_send_queue_max,
            settings.sim_max_subscriptions,
            settings.sim_max_filter_values,
        )
        gate = self.hub.first_subscription if settings.sim_wait_for_subscriber else None
        # The chain opens the gate too: a polygon-only ingestor never subscribes to the Dome feed.
        self.chain = ChainNode(settings.sim_block_time_s, gate)
        # The feeds' quirks, one object read live: tests switch them on a running simulator.
        self.quirks = Quirks.of(settings)
        use_quirks(self.history, self.quirks)
        schedule = with_quirks(build_schedule(settings), self.quirks)
        self.emitter = Emitter(schedule, self.history, self.hub, gate, self.chain)
        tape = load_tape(resolve_path(settings.sim_tape)) if settings.sim_mode == "tape" else []
        markets = gamma_markets(tape)
        self.app = create_app(settings, self.hub, self.history, self.emitter, markets)
        add_chain_routes(self.app, self.chain)
        self.server: uvicorn.Server | None = None
        # Set once the port listens (connections then queue until the server takes them).
        self.listening = asyncio.Event()
        self.port = settings.sim_port

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set or the server ends; a task's failure is raised at the end."""
        s = self.settings
        sock = listen(s.sim_host, s.sim_port)
        self.port = sock.getsockname()[1]
        self.listening.set()
        server = self.server = http_server(self.app, s.sim_host, self.port)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        emitting = asyncio.create_task(self.emitter.run())
        mining = asyncio.create_task(self.chain.run())
        stopping = asyncio.create_task(stop.wait())
        log.info(
            "simulator_started",
            extra={
                "host": s.sim_host,
                "port": self.port,
                "mode": s.sim_mode,
                "speed": s.sim_speed,
                "rate": s.sim_rate,
                "loop": s.sim_loop,
                "auth": bool(s.sim_api_key.get_secret_value()),
            },
        )
        try:
            pending = {serving, emitting, stopping}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # A finished finite tape keeps the REST history and the control API up.
                if done == {emitting} and emitting.exception() is None:
                    continue
                break
        finally:
            mining.cancel()
            emitting.cancel()
            stopping.cancel()
            await self.hub.close_all(SHUTDOWN_CODE, SHUTDOWN_REASON)
            await self.app.state.rtds.close_all()
            server.should_exit = True
            await asyncio.gather(serving, emitting, mining, stopping, return_exceptions=True)
        for task in (emitting, serving):
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                raise error
        log.info("simulator_stopped", extra={"emitted": self.emitter.emitted})


async def serve(settings: SimulatorSettings) -> None:
    simulator = Simulator(settings)
    await simulator.run(stop_event())


def main() -> None:
    settings = SimulatorSettings()
    configure_logging("simulator", settings.log_level)
    try:
        asyncio.run(serve(settings))
    except (TapeError, WalletFileError, OSError) as exc:
        # A missing tape, a bad wallets file or a port in use: say which, without a traceback.
        log.error("simulator_failed", extra={"error": str(exc)})
        raise SystemExit(1) from None
