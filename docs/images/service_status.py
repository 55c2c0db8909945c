"""The status-page screenshot in docs/service.md (docs only, not CI): a reference edge on 127.0.0.1 with a
few jobs, then headless Chromium (`apt-get install -y chromium`). Run: python docs/images/service_status.py OUT.png"""
import subprocess
import sys
import tempfile
import time

import torch
from relaydiff.engine.family import load_family
from relaydiff.serve.app import create_app
from relaydiff.serve.auth import TokenTable
from relaydiff.serve.client import DeviceClient
from relaydiff.serve.demo_round import DEMO_DEVICES
from relaydiff.serve.edge import EdgeSettings
from relaydiff.serve.loopback import LoopbackServer

torch.set_num_threads(1)
fam, dev = load_family("reference"), load_family("reference")
tokens = {d.name: f"{d.name}-demo-token-{i:04d}" for i, d in enumerate(DEMO_DEVICES)}
app = create_app(fam, EdgeSettings(default_steps=20, status_thumbnails=True, fetch_timeout_s=600, report_timeout_s=600),
                 TokenTable(tokens))
styles = sorted(dev.adapters)
with LoopbackServer(app) as server:
    for rnd in range(2):
        for i, d in enumerate(DEMO_DEVICES):
            with DeviceClient(server.url, tokens[d.name], dev, timeout_s=300) as c:
                out = c.run(d.prompt, 10 * rnd + i, adapter=styles[i] if d.style else None,
                            device_class=d.device_class, preferences=d.preferences)
                print(out.job["kind"], out.job["plan_text"], out.finished_by)
    # two more that are still in flight when the page is taken: one submitted, one handed to its device
    with DeviceClient(server.url, tokens["jon"], dev) as c:
        v = c.submit("a green star above a red circle", 5, device_class="phone-flagship",
                     preferences=DEMO_DEVICES[1].preferences, adapter="outline")
        print(v["kind"], v["plan_text"])
    time.sleep(1.0)
    out = sys.argv[1]
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tempfile.mkdtemp()}", f"--screenshot={out}", "--window-size=1280,900", server.url + "/"]
    print(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stderr[-500:])
