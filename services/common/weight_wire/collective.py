"""The collective group a weight update is broadcast over, independent of any default
group, meeting peers on the store keys SGLang's own group helper uses.

Every socket it listens on binds one address: the rendezvous store listens on the
address it advertises (torch's TCPStore alone would listen on every interface), and the
gloo transport listens on that address on the hosting side and, on a joining side, on
the local address that routes to the store.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

from clotho.v1 import inference_service_pb2 as pb

# Collective backends by name, as CollectiveGroup takes them, and by wire enum.
BACKENDS: dict[str, pb.CollectiveBackend] = {"gloo": pb.COLLECTIVE_BACKEND_GLOO, "nccl": pb.COLLECTIVE_BACKEND_NCCL}
BACKEND_NAMES: dict[int, str] = {v: k for k, v in BACKENDS.items()}


class CollectiveGroup:
    """A process group for weight transfer, independent of any default group (so a
    trainer under torchrun can own it next to its data-parallel group).

    The trainer's rank 0 hosts the rendezvous store; shards connect to it. The store is
    prefixed by the group name, as torch's own `new_group` does, so peers that form
    their group with `init_process_group`-style helpers (SGLang) meet the same keys.
    """

    def __init__(
        self,
        backend: str,
        address: str,
        port: int,
        world_size: int,
        rank: int,
        group_name: str,
        timeout_seconds: float,
        store: dist.TCPStore | None = None,
    ) -> None:
        self.backend = backend
        self.address = address
        self.world_size = world_size
        self.rank = rank
        self.group_name = group_name
        self.timeout = datetime.timedelta(seconds=timeout_seconds)
        if store is None:
            store = dist.TCPStore(
                address,
                port,
                world_size,
                is_master=(rank == 0),
                timeout=self.timeout,
                wait_for_workers=False,
            )
        self.store = store
        self.port = store.port
        # The backend objects themselves (not a ProcessGroup wrapping them).
        self._pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None = None

    @classmethod
    def host(
        cls, backend: str, address: str, world_size: int, group_name: str, timeout_seconds: float
    ) -> CollectiveGroup:
        """The rank-0 side: start the store on a free port of `address` (its port is
        `.port`), listening on that address only."""
        listener = listen_socket(address)
        port = listener.getsockname()[1]
        store = dist.TCPStore(
            address,
            port,
            world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_seconds),
            wait_for_workers=False,
            # The store takes the socket over and closes it with itself.
            master_listen_fd=listener.detach(),
        )
        return cls(backend, address, store.port, world_size, 0, group_name, timeout_seconds, store=store)

    def connect(self) -> None:
        """Form the group; blocks until every rank has joined or the timeout passes."""
        # The same keys SGLang's init_custom_process_group meets: it prefixes the store
        # with the group name, then torch's group helper adds "<name>/" and "<device>/".
        device = "cuda" if self.backend == "nccl" else "cpu"
        prefix = dist.PrefixStore(
            f"{device}/",
            dist.PrefixStore(f"{self.group_name}/", dist.PrefixStore(self.group_name, self.store)),
        )
        if self.backend == "gloo":
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # untyped in torch's stubs
            options._timeout = self.timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=self._transport_address())]
            self._pg = dist.ProcessGroupGloo(prefix, self.rank, self.world_size, options)
        elif self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self._pg = dist.ProcessGroupNCCL(prefix, self.rank, self.world_size, opts)
        else:
            raise ValueError(f"unknown backend {self.backend!r}")

    def _transport_address(self) -> str:
        """Where this rank's gloo transport listens: the store's address on rank 0, else
        the local address that routes to the store."""
        if self.rank == 0:
            return self.address
        return local_address_towards(self.address, self.port)

    @property
    def connected(self) -> bool:
        return self._pg is not None

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        """One collective; raises (never hangs) past the group's timeout."""
        self.wait(self.broadcast_async(tensor, root))

    def broadcast_async(self, tensor: torch.Tensor, root: int = 0) -> dist.Work:
        """Start one collective and return at once; `wait` for it. Keeping the next
        bucket's broadcast queued behind the current one keeps the link busy between
        buckets (a stop-and-wait per bucket leaves it idle for a round trip each time)."""
        if self._pg is None:
            raise RuntimeError("collective group is not connected")
        work: dist.Work = self._pg.broadcast(tensor, root, self.timeout)  # type: ignore[union-attr]  # torch's stubs omit Backend.broadcast
        return work

    def wait(self, work: dist.Work) -> None:
        """Wait for a started collective; raises (never hangs) past the group's timeout."""
        work.wait(self.timeout)

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            shutdown = getattr(pg, "shutdown", None) or getattr(pg, "abort", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:  # noqa: BLE001 - a broken group may fail to shut down; we drop it anyway
                    pass


def listen_socket(address: str) -> socket.socket:
    """A TCP socket listening on a free port of `address` only."""
    family, kind, proto, _name, sockaddr = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def local_address_towards(address: str, port: int) -> str:
    """This machine's address on the route to `address` (no packet is sent)."""
    family, _kind, _proto, _name, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)
        return str(probe.getsockname()[0])
