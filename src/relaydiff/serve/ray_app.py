"""`relaydiff serve edge --ray`: the edge on Ray Serve, an ingress and N engine replicas.

Each engine replica is a deployment of its own (``relaydiff-engine-0`` ...) holding a whole edge
service: its own continuous-batching executor, round decider and SQLite store (``DB.replica-I``),
and its job ids carry its mark (``r{I}-``). The ingress deployment (FastAPI behind Ray Serve's
HTTP proxy) sends each new job to the replicas in turn and every later request about a job to
the replica its id names, forwarding the request as it came: the replica's own app authenticates,
validates and answers, so the HTTP API is the single edge's. Rounds (and shared prefixes) are
decided per replica. ``/``, ``/metrics`` and ``/docs`` show replica ``?replica=I`` (default 0).

Multi-node: ``ray start --head --port 6379`` on one machine, ``ray start --address HEAD:6379`` on
the others (the same Ray and Python everywhere, the family and tokens file on every node), then
``relaydiff serve edge --ray --ray-address auto --replicas N`` on the head.
"""


import dataclasses
import itertools
import re
from typing import Any, Optional

import httpx
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from relaydiff.engine.family import load_family
from relaydiff.serve.app import create_app
from relaydiff.serve.auth import TokenTable
from relaydiff.serve.edge import EdgeSettings

_JOB_PATH = re.compile(r"^/?v1/jobs/r(\d+)-")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "host"}


class EngineReplica:
    """One edge service (its executor, decider and store) answering forwarded HTTP requests in-process."""

    def __init__(self, family: str, settings: dict[str, Any], tokens: TokenTable, index: int, threads: int = 1,
                 trace: bool = False):
        if threads:
            torch.set_num_threads(threads)
        db = settings.get("db_path", ":memory:")
        settings = {**settings, "job_id_prefix": f"r{index}-",
                    "db_path": db if db == ":memory:" else f"{db}.replica-{index}"}
        self.app = create_app(load_family(family, trace=trace), EdgeSettings(**settings), tokens)
        self._http: Optional[httpx.AsyncClient] = None
        self._lifespan: Any = None

    async def _client(self) -> httpx.AsyncClient:
        if self._http is None:   # the app's lifespan (worker start, store listener) needs this replica's loop
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()
            self._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica",
                                           timeout=httpx.Timeout(700.0))
        return self._http

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        http = await self._client()
        resp = await http.request(method, f"{path}?{query}" if query else path, headers=headers, content=body)
        return resp.status_code, [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS], resp.content

    async def unfinished(self) -> int:
        await self._client()
        return self.app.state.service.unfinished

    def __del__(self) -> None:
        self.app.state.service.stop()


ingress_api = FastAPI(title="relaydiff edge server (Ray Serve)", version="1")


@serve.ingress(ingress_api)
class Ingress:
    """Routes: a new job to the next replica, a job's requests to the replica its id names."""

    def __init__(self, *engines: DeploymentHandle):
        self.engines = list(engines)
        self._next = itertools.cycle(range(len(self.engines)))

    async def _forward(self, index: int, request: Request, path: str) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        status, out_headers, body = await self.engines[index].forward.remote(
            request.method, path, request.url.query, headers, await request.body())
        return Response(body, status_code=status, headers=dict(out_headers))

    @ingress_api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @ingress_api.get("/readyz")
    async def readyz(self) -> Any:
        unfinished = [await e.unfinished.remote() for e in self.engines]
        return {"status": "ready", "replicas": len(self.engines), "unfinished": unfinished}

    @ingress_api.api_route("/{path:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def route(self, path: str, request: Request) -> Response:
        path = "/" + path
        if path == "/v1/jobs" and request.method == "POST":
            return await self._forward(next(self._next), request, path)
        if path.startswith("/v1/jobs/"):
            match = _JOB_PATH.match(path)
            if match is None or int(match.group(1)) >= len(self.engines):
                job = path.split("/")[3]
                return JSONResponse({"detail": f"no job {job!r}"}, status_code=404)
            return await self._forward(int(match.group(1)), request, path)
        replica = request.query_params.get("replica", "0")
        if not replica.isdigit() or int(replica) >= len(self.engines):
            return JSONResponse({"detail": f"replica must be 0..{len(self.engines) - 1}"}, status_code=422)
        return await self._forward(int(replica), request, path)


def build_ray_app(family: str, settings: EdgeSettings, tokens: TokenTable, replicas: int,
                  cpus_per_replica: float = 1.0, threads: int = 1, trace: bool = False) -> Any:
    """The Ray Serve application: ``replicas`` engine deployments behind one ingress."""
    engine = serve.deployment(EngineReplica, ray_actor_options={"num_cpus": cpus_per_replica},
                              max_ongoing_requests=1000)
    fields = dataclasses.asdict(settings)
    engines = [engine.options(name=f"relaydiff-engine-{i}").bind(family, fields, tokens, i, threads, trace)
               for i in range(replicas)]
    return serve.deployment(Ingress, name="relaydiff-ingress", ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=1000).bind(*engines)


def run_on_ray(app: Any, host: str, port: int, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray, serve ``app`` on host:port; returns once it is deployed."""
    # lazy: Ray is optional (the ray extra); only --ray needs it
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 _node_ip_address="127.0.0.1" if address is None and host == "127.0.0.1" else None,
                 log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="relaydiff", route_prefix="/")
