"""Learning while serving: an expert committed to a served ensemble is picked up without a
restart, and no request fails or sees a half-loaded ensemble meanwhile."""

from __future__ import annotations

import json
import threading

import httpx

from conftest import TINY, running, wait_until
from seecl.config import ServerConfig, load_config
from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.server import ensemble_app


def test_a_new_expert_is_served_without_a_restart(tmp_path):
    root = tmp_path / "ens"
    SeeEnsemble(root, load_config(overrides=TINY)).learn(make_task("reverse_list", "train", 32))
    served = SeeEnsemble.open(root)
    query = make_task("add", "eval", 1).instances[0].query
    outcomes: list[tuple[int, list[str]]] = []  # (status, experts the route asked)
    stop = threading.Event()

    def traffic(url: str) -> None:
        """Plain and streamed requests, one after another, all through the switch."""
        while not stop.is_set():
            stream = len(outcomes) % 2 == 1
            body = {"prompt": query, "max_tokens": 4, "stream": stream}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            if response.status_code != 200:
                outcomes.append((response.status_code, []))
                continue
            if stream:
                events = [json.loads(line[6:]) for line in response.text.splitlines() if line[6:7] == "{"]
                choice = next(e["choices"][0] for e in events if e["choices"] and e["choices"][0].get("route"))
            else:
                choice = response.json()["choices"][0]
            outcomes.append((200, [check["expert"] for check in choice["route"]["checks"]]))

    with running(ensemble_app(served, ServerConfig(reload_interval_s=0.05))) as url:
        assert httpx.get(f"{url}/health").json()["experts"] == ["reverse_list"]
        worker = threading.Thread(target=traffic, args=(url,))
        worker.start()
        try:
            wait_until(lambda: len(outcomes) >= 2, "requests before the learn")
            # `seecl learn` in its own SeeEnsemble (its own model), as another process would
            SeeEnsemble.open(root, TINY[1:]).learn(make_task("add", "train", 32))
            wait_until(lambda: httpx.get(f"{url}/health").json()["experts"] == ["reverse_list", "add"], "the reload")
            seen = len(outcomes)
            wait_until(lambda: len(outcomes) >= seen + 3, "requests after the reload")
        finally:
            stop.set()
            worker.join(120)
        statuses = {status for status, _ in outcomes}
        assert statuses == {200}, outcomes
        # Every request saw one whole ensemble: the old one, then from some request on the new one
        # (newest expert asked first).
        firsts = [asked[0] for _, asked in outcomes]
        switch = firsts.index("add")
        assert set(firsts[:switch]) == {"reverse_list"} and set(firsts[switch:]) == {"add"}, firsts
        assert len(firsts) - switch >= 3
        # The new expert can be asked by name, and is listed.
        named = httpx.post(f"{url}/v1/completions", json={"model": "ens/add", "prompt": query, "max_tokens": 3})
        assert named.status_code == 200 and named.json()["choices"][0]["route"]["reason"] == "requested"
        assert "ens/add" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        metrics = httpx.get(f"{url}/metrics").text
        assert "seecl_ensemble_reloads_total 1.0" in metrics


def test_a_served_ensemble_gets_the_rows_its_first_expert_shares(tmp_path):
    """With model.indicator_rows=shared the first expert's indicator rows move into the base: a
    server that opened the ensemble before that expert existed must write them in when it loads it."""
    from seecl.serving.live import LiveEnsemble

    settings = [*TINY, "model.indicator_rows=shared"]
    served = SeeEnsemble(tmp_path / "ens", load_config(overrides=settings))
    _ = served.base  # the ensemble exists, without experts, when the server starts
    live = LiveEnsemble(served)
    assert live.experts() == [] and not live.refresh()
    SeeEnsemble.open(tmp_path / "ens", settings[1:]).learn(make_task("add", "train", 32))
    assert live.refresh() and live.experts() == ["add"]
    queries = [inst.query for inst in make_task("add", "eval", 3).instances] + ["Hi there"]
    fresh = SeeEnsemble.open(tmp_path / "ens").ask(queries, 4)
    answers = live.ask(queries, 4)
    assert [(a.route.answered_by, a.route.checks, a.text) for a in answers] == [
        (a.route.answered_by, a.route.checks, a.text) for a in fresh
    ]
