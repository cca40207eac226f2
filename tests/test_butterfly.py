"""Butterfly averaging (``sentinel.worker.butterfly``): the protocol's logic between replicas.

Real workers, signatures and wire encoding, with calls routed in-process between them so every
case is exact and fast; the same code runs over P2P streams between real processes in
``test_swarm_screening.py::test_poisoned_averaging_contributions_get_the_replica_banned``.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.attacks.loader import load_attack
from sentinel.net.runtime import PeerCallError
from sentinel.protocol import rpc as wire
from sentinel.protocol.aggregation import aggregate, centered_clip, partition
from sentinel.protocol.codec import Limits, decode, encode
from sentinel.protocol.errors import ProtocolError
from sentinel.protocol.identity import Identity
from sentinel.protocol.signing import sign_message
from sentinel.run.manifest import RunManifest, TrainingConfig
from sentinel.verifier.complaints import ComplaintDesk
from sentinel.worker.node import WorkerNode

STAGE = 1
NUMEL = 1000


@given(numel=st.integers(1, 5000), peers=st.integers(1, 40), max_part=st.integers(1, 3000))
@settings(max_examples=300, deadline=None)
def test_partition_covers_the_vector_in_order_with_a_part_per_peer_and_none_too_long(numel, peers, max_part):
    parts = partition(numel, peers, max_part)
    assert parts[0][0] == 0 and parts[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    assert all(0 < hi - lo <= max_part for lo, hi in parts)
    assert len(parts) >= min(peers, numel)
    assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1  # balanced


def test_partition_rejects_impossible_input():
    with pytest.raises(ValueError):
        partition(0, 3, 10)
    with pytest.raises(ValueError):
        partition(10, 0, 10)


class Runner:
    """A stage's flat parameters, as much of ``StageRunner`` as averaging touches."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat.clone()
        self.version = 10
        self.stats = SimpleNamespace(averaging_rounds=0)

    def num_parameters(self) -> int:
        return self.flat.numel()

    def flat_parameters(self) -> torch.Tensor:
        return self.flat.clone()

    def load_flat_parameters(self, flat: torch.Tensor) -> None:
        self.flat = flat.clone()
        self.stats.averaging_rounds += 1


class Net:
    """Routes calls between the workers; every message crosses the real codec."""

    def __init__(self) -> None:
        self.nodes: dict[str, WorkerNode] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.down: set[str] = set()
        self.loop = asyncio.new_event_loop()

    async def call(self, src: str, dst: str, name: str, req, timeout: float):
        self.calls.append((src, dst, name))
        if dst in self.down:
            raise PeerCallError(f"{dst[-8:]} is down", "unreachable")
        node = self.nodes[dst]
        handler = node.handlers()[name]  # behind the worker's dispatcher, as over the network
        try:
            resp = await handler(_wire(req), src)
        except ProtocolError as e:
            raise PeerCallError(str(e), e.reason) from e
        return _wire(resp)


def _wire(msg):
    return decode(b"".join(bytes(p) for p in encode(msg)), Limits())


class Runtime:
    def __init__(self, net: Net) -> None:
        self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self.net = net
        self.limits = Limits()
        self.banned: set[str] = set()

    async def call(self, peer, name, req, timeout):
        return await self.net.call(self.peer_id, peer, name, req, timeout)

    async def get(self, key):
        return {}


def _stage(n: int, rule: str = "mean", part_numel: int = 2**20, audit: float = 0.0, seed: int = 0,
           attack: int | None = None) -> tuple[Net, list[WorkerNode]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(NUMEL, generator=g)
    manifest = RunManifest(run_id="butterfly-test", training=TrainingConfig(
        averaging=rule, averaging_part_numel=part_numel, averaging_audit=audit))
    net = Net()
    nodes = []
    for i in range(n):
        rt = Runtime(net)
        node = WorkerNode(runtime=rt, manifest=manifest, attack=load_attack("avg_scaling") if i == attack else None)
        node.stage, node.max_step = STAGE, 30
        node.runner = Runner(base + 0.05 * torch.randn(NUMEL, generator=g))
        node._anchor = node.runner.flat - 0.01 * torch.randn(NUMEL, generator=g)  # the previous round's aggregate
        node.reports: list = []
        node.butterfly.report_lie = lambda *a, node=node: node.reports.append(a)
        node.butterfly.complain = lambda *a: None

        async def banned(rt=rt):
            return rt.banned

        node.butterfly.banned = banned

        async def replicas():
            return list(net.nodes)

        node.butterfly.replicas = replicas
        net.nodes[rt.peer_id] = node
        nodes.append(node)
    return net, nodes


def _run(nodes: list[WorkerNode], coro):
    """Run on the stage's one event loop, as a worker does (its locks belong to that loop)."""
    return nodes[0].runtime.net.loop.run_until_complete(coro)


def _rounds(nodes: list[WorkerNode], who: list[int] | None = None) -> list[torch.Tensor]:
    async def go():
        ids = [n.runtime.peer_id for n in nodes]
        return await asyncio.gather(*(nodes[i].butterfly.round([p for p in ids if p != ids[i]])
                                      for i in (who if who is not None else range(len(nodes)))))

    return _run(nodes, go())


@pytest.mark.parametrize("rule", ["mean", "trimmed-mean"])
@pytest.mark.parametrize("part_numel", [2**20, 64])
def test_a_round_gives_every_replica_the_gather_reduction(rule, part_numel):
    """Coordinate-wise rules reduce the same whether the vector is whole or cut into parts,
    and with small parts (16 of them for 4 replicas) no message carries more than one part."""
    net, nodes = _stage(4, rule, part_numel)
    expected = aggregate([n.runner.flat for n in nodes], rule)
    for got in _rounds(nodes):
        assert torch.allclose(got, expected, atol=1e-6)
    assert all(len(n.butterfly.distrusted) == 0 for n in nodes)
    served = sum(n.butterfly.stats["parts_served"] for n in nodes)
    assert served == sum(n.butterfly.stats["parts_pushed"] for n in nodes) > 0


def test_centered_clip_is_applied_part_by_part():
    net, nodes = _stage(4, "centered-clip", 100)
    flats = torch.stack([n.runner.flat for n in nodes])
    expected = torch.cat([centered_clip(flats[:, lo:hi]) for lo, hi in partition(NUMEL, 4, 100)])
    for got in _rounds(nodes):
        assert torch.allclose(got, expected, atol=1e-5)


def test_a_requester_pushes_one_copy_and_reducers_reuse_pushed_slices():
    """When all replicas average together, each pushes its slice of every part it does not own,
    reducers find the others' pushes instead of pulling, and reduce each part once."""
    net, nodes = _stage(4, "mean", 2**20)
    _rounds(nodes)
    pushes = [c for c in net.calls if c[2] == wire.REDUCE]
    assert len(pushes) == 4 * 3
    pulled = sum(n.butterfly.stats["slices_pulled"] for n in nodes)
    # reductions that start before the others' pushes arrive pull, but each slice once at most
    assert pulled <= 4 * 3
    # the owner's and its three requesters' reductions of a part have the same inputs: computed
    # once (16 without sharing; a margin for a push that misses the wait on a loaded machine)
    assert sum(n.butterfly.stats["parts_reduced"] for n in nodes) <= 8
    _rounds(nodes)
    assert sum(n.butterfly.stats["slices_pulled"] for n in nodes) == pulled  # the second round reuses


def test_a_lying_reducer_is_caught_by_its_first_audit_reported_and_reduced_around():
    net, nodes = _stage(4, "centered-clip", 2**20, seed=3, attack=3)
    liar = nodes[3].runtime.peer_id
    results = _rounds(nodes, who=[0, 1, 2])
    flats = [n.runner.flat for n in nodes]
    poisoned = nodes[3].poison_contribution(flats[3], "x")  # its contribution is poisoned too
    expected = torch.cat([centered_clip(torch.stack([*flats[:3], poisoned])[:, lo:hi])
                          for lo, hi in partition(NUMEL, 4, 2**20)])
    for i in range(3):
        assert liar in nodes[i].butterfly.distrusted
        assert nodes[i].butterfly.stats["lies_caught"] == 1
        assert torch.allclose(results[i], expected, atol=1e-5)  # its part recomputed honestly
        (reducer, result, inputs), = nodes[i].reports
        assert reducer == liar
        desk = ComplaintDesk("butterfly-test", 3.0, 0.02, None, now_step=lambda: 30, rule="centered-clip",
                             min_interval_s=0.0)
        complaint = _reduction_complaint(nodes[i], liar, result, inputs)
        verdict = desk.judge_reduction(_wire(complaint), nodes[i].runtime.peer_id,
                                       lambda s: [n.runtime.peer_id for n in nodes])
        assert verdict.upheld and verdict.reason == "reduction" and verdict.accused == liar
    # the next round does not ask the liar again
    before = len([c for c in net.calls if c[1] == liar and c[2] == wire.REDUCE])
    _rounds(nodes, who=[0])
    assert len([c for c in net.calls if c[1] == liar and c[2] == wire.REDUCE]) == before


def test_an_honest_contributor_that_lies_only_as_a_reducer_is_caught():
    """``avg_reducer``: clean contributions (no screen sees it), faked reductions (audits do)."""
    net, nodes = _stage(4, "trimmed-mean", 100, seed=5, attack=None)
    nodes[2].attack = load_attack("avg_reducer")
    liar = nodes[2].runtime.peer_id
    assert torch.equal(nodes[2].poison_contribution(nodes[2].runner.flat, "x"), nodes[2].runner.flat)
    results = _rounds(nodes, who=[0, 1, 3])
    expected = aggregate([n.runner.flat for n in nodes], "trimmed-mean")
    for i, got in zip((0, 1, 3), results, strict=True):
        assert liar in nodes[i].butterfly.distrusted and nodes[i].reports
        assert torch.allclose(got, expected, atol=1e-6)  # every part it answered recomputed here


def test_a_reducer_that_turns_liar_after_passing_its_first_audit_is_caught_by_the_outlier_rule():
    """No random audits at all (share 0): once a reducer has passed an audit, only the outlier
    rule looks at it, and a sign-flipped x10 answer moves the requester's slice far more than
    the round's honest parts do."""
    net, nodes = _stage(4, "centered-clip", 2**20, audit=0.0, seed=7)
    _rounds(nodes, who=[0])  # every reducer honest and audited once
    assert len(nodes[0].butterfly._audited) == 3 and not nodes[0].butterfly.distrusted
    liar = nodes[2]
    liar.attack = load_attack("avg_reducer")
    honest_audits = nodes[0].butterfly.stats["audits"]
    got, = _rounds(nodes, who=[0])
    assert liar.runtime.peer_id in nodes[0].butterfly.distrusted
    assert nodes[0].butterfly.stats["audits"] == honest_audits + 1  # the liar's answer only
    expected = torch.cat([centered_clip(torch.stack([n.runner.flat for n in nodes])[:, lo:hi])
                          for lo, hi in partition(NUMEL, 4, 2**20)])
    assert torch.allclose(got, expected, atol=1e-5)


def _reduction_complaint(node: WorkerNode, accused: str, result, inputs):
    req = wire.request(node.run, 30, 0, STAGE, "complaint",
                       {"part": result.tensors["part"], "params": torch.stack([m.tensors["params"] for m in inputs])},
                       kind="reduction", accused=accused, evidence=dict(result.header),
                       contributions=[dict(m.header) for m in inputs])
    return sign_message(req, node.runtime.identity)


def test_an_honest_reducer_cannot_be_framed_with_its_own_commitment():
    """A replica complaining about an honest reducer can only show the slices it committed to,
    and those reproduce its answer: dismissed. Altering one breaks its contributor's signature."""
    net, nodes = _stage(3, "centered-clip", 2**20, audit=1.0)
    _rounds(nodes, who=[0])
    owner = nodes[1]
    members = [n.runtime.peer_id for n in nodes]
    result = _answer(nodes, owner)  # the reducer's signed answer to replica 0, and the inputs it kept
    kept = owner.butterfly._kept[bytes(result.header["digest"])]
    desk = ComplaintDesk("butterfly-test", 3.0, 0.02, None, now_step=lambda: 30, rule="centered-clip",
                         min_interval_s=0.0)
    verdict = desk.judge_reduction(_wire(_reduction_complaint(nodes[0], members[1], result, kept.inputs)),
                                   members[0], lambda s: members)
    assert not verdict.upheld
    forged = [kept.inputs[0], *kept.inputs[1:]]
    forged[0] = type(forged[0])(header=dict(forged[0].header), tensors={"params": forged[0].tensors["params"] + 1})
    with pytest.raises(ProtocolError):
        desk.judge_reduction(_wire(_reduction_complaint(nodes[0], members[1], result, forged)),
                             members[0], lambda s: members)


def _answer(nodes, owner):
    """A fresh signed answer of ``owner`` to replica 0 for the first part it owns."""
    ids = sorted(n.runtime.peer_id for n in nodes)
    i = ids.index(owner.runtime.peer_id)
    lo, hi = partition(NUMEL, len(ids), 2**20)[i]
    asker = nodes[0]

    async def go():
        own = await asker.butterfly._own_flat()
        req = asker.butterfly._sign_slice(own, lo, hi, "reduce", group=ids)
        return await owner.handlers()[wire.REDUCE](_wire(req), asker.runtime.peer_id)

    return _run(nodes, go())


@pytest.mark.parametrize("case", ["ok", "outside", "too_long", "tiny", "not_member", "stale", "banned",
                                  "stranger", "direction"])
def test_a_reducer_refuses_bad_requests_with_a_clear_error(case):
    """Each bad push is refused by name; the same push unmodified ("ok") is served."""
    net, nodes = _stage(3, "mean", 200)
    asker, owner = nodes[0], nodes[1]
    ids = sorted(n.runtime.peer_id for n in nodes)
    lo, hi = partition(NUMEL, 3, 200)[1]  # a part a round of three makes (200 elements at most)
    group, direction, step = ids, "reduce", 30
    error = {"outside": "one of the parts", "too_long": "one of the parts", "tiny": "one of the parts",
             "not_member": "without both of us", "stale": "signed at step", "banned": "banned",
             "stranger": "not a replica", "direction": "direction"}.get(case)
    if case == "outside":
        lo, hi = 900, 1100
    elif case == "too_long":
        lo, hi = 0, 201
    elif case == "tiny":  # a few hand-picked coordinates: never signed, never evidence
        lo, hi = 5, 8
    elif case == "not_member":
        group = [asker.runtime.peer_id, nodes[2].runtime.peer_id]
    elif case == "stale":
        step = 10
    elif case == "banned":
        owner.runtime.banned = {asker.runtime.peer_id}
    elif case == "stranger":
        async def others():
            return [n.runtime.peer_id for n in nodes[1:]]

        owner.butterfly.replicas = others
    elif case == "direction":
        direction = "params_result"
    flat = torch.zeros(NUMEL + 200)
    req = sign_message(wire.request(asker.run, step, 0, STAGE, direction, {"params": flat[lo:hi].contiguous()},
                                    part=[lo, hi], version=1, group=group), asker.runtime.identity)
    if error is None:
        reply = _run(nodes, owner.handlers()[wire.REDUCE](_wire(req), asker.runtime.peer_id))
        assert reply.header["direction"] == "reduce_result" and reply.tensors["part"].numel() == hi - lo
        assert owner.butterfly.stats["parts_served"] == 1
        return
    with pytest.raises(ProtocolError, match=error):
        _run(nodes, owner.handlers()[wire.REDUCE](_wire(req), asker.runtime.peer_id))
    assert owner.butterfly.stats["parts_served"] == 0


def test_params_are_signed_only_for_parts_a_round_makes_and_steps_that_have_come():
    """A replica signs no slice of hand-picked coordinates (a complainer could find a few that
    look like an outlier in anyone's ordinary drift) and no reply dated in the future."""
    net, nodes = _stage(3, "mean", 200)
    asker, owner = nodes[0], nodes[1]

    def ask(part, step=30):
        req = sign_message(wire.request(asker.run, step, 0, STAGE, "params", {}, **({"part": part} if part else {})),
                           asker.runtime.identity)
        return _run(nodes, owner.handlers()[wire.PARAMS](_wire(req), asker.runtime.peer_id))

    lo, hi = partition(NUMEL, 4, 200)[2]
    assert torch.equal(ask([lo, hi]).tensors["params"], owner.runner.flat[lo:hi])
    assert ask(None).tensors["params"].numel() == NUMEL
    for bad in ([5, 8], [lo, hi + 1], [0, NUMEL]):
        with pytest.raises(ProtocolError, match="one of the parts"):
            ask(bad)
    with pytest.raises(ProtocolError, match="params requested for step 130, I am at step 30"):
        ask(None, step=30 + 100)


def test_an_audit_is_not_fooled_by_a_huge_slice_the_reducer_commits_to():
    """The audit's tolerance is scaled by the expected answer and the median input, never the
    largest input: a reducer's own slice of 1e20 must not make its lie 'close enough'."""
    from sentinel.protocol.aggregation import same_reduction

    g = torch.Generator().manual_seed(0)
    honest = [torch.randn(500, generator=g) for _ in range(3)]
    for rule in ("mean", "trimmed-mean", "centered-clip"):
        for huge in (1e6, 1e20):
            inputs = [*honest, torch.full((500,), huge)]
            lie = torch.randn(500, generator=g)
            assert not same_reduction(lie, inputs, rule), (rule, huge)
            assert same_reduction(aggregate(inputs, rule), inputs, rule), (rule, huge)


def test_a_reducer_that_leaves_a_member_out_is_not_used_but_not_called_a_liar():
    """A reducer that does not know one member yet commits to fewer slices than the group: its
    answer is not taken (a reducer free to leave members out could keep only its accomplices'),
    the part is reduced by the requester, and nobody is distrusted."""
    net, nodes = _stage(4, "mean")
    ids = [n.runtime.peer_id for n in nodes]

    async def three():
        return ids[:3]

    nodes[1].butterfly.replicas = three  # node 1 does not know node 3
    expected = aggregate([n.runner.flat for n in nodes], "mean")
    got, = _rounds(nodes, who=[0])
    assert nodes[0].butterfly.stats["fallbacks"] >= 1 and not nodes[0].butterfly.distrusted
    assert torch.allclose(got, expected, atol=1e-6)


def test_an_unknown_or_foreign_audit_is_refused():
    net, nodes = _stage(3, "mean")
    _rounds(nodes, who=[0])
    owner = nodes[1]
    digest = next(iter(owner.butterfly._kept))
    stranger = Identity.generate()
    for who, of in ((stranger, digest), (nodes[0].runtime.identity, b"\0" * 32)):
        req = sign_message(wire.request(owner.run, 30, 0, STAGE, "reduce_audit", {}, of=of, index=0), who)
        with pytest.raises(ProtocolError):
            _run(nodes, owner.handlers()[wire.REDUCE_AUDIT](_wire(req), who.peer_id))


def test_a_reducer_that_does_not_answer_is_reduced_locally():
    net, nodes = _stage(3, "mean")
    net.down.add(nodes[2].runtime.peer_id)
    expected = aggregate([n.runner.flat for n in nodes[:2]], "mean")
    got, = _rounds(nodes, who=[0])
    assert nodes[0].butterfly.stats["fallbacks"] >= 1
    assert torch.allclose(got, expected, atol=1e-6)  # the silent replica's slices are left out


@pytest.mark.parametrize("field,value", [("averaging_partition", "ring"), ("averaging_part_numel", 0),
                                         ("averaging_part_numel", True), ("averaging_reuse_s", -1.0),
                                         ("averaging_audit", 1.5), ("averaging_audit", float("nan"))])
def test_the_manifest_refuses_impossible_butterfly_settings_by_name(field, value):
    from sentinel.run.manifest import ManifestError

    with pytest.raises(ManifestError, match=f"training.{field}"):
        RunManifest(training=TrainingConfig(**{field: value}))


def test_auto_gathers_a_stage_that_fits_in_half_a_message_and_butterflies_a_larger_one():
    m = RunManifest()
    assert m.training.averaging_partition == "auto"
    half = m.max_message_bytes // 2 // 4
    assert not m.butterfly_averaging(half) and m.butterfly_averaging(half + 1)
    assert RunManifest(training=TrainingConfig(averaging_partition="butterfly")).butterfly_averaging(10)
    assert not RunManifest(training=TrainingConfig(averaging_partition="gather")).butterfly_averaging(10**9)
