"""Clusters as data: one YAML per machine type (configs/clusters/), loaded into a typed Cluster.

Numbers are per GPU. Bandwidths are bytes/s in one direction (what one GPU can send while it also receives),
latencies are seconds per step of a collective. `gemm_efficiency` is the achievable fraction of peak for large
BF16 GEMMs (an assumption, stated in each file); `collective_efficiency` is the fraction of link bandwidth each
collective reaches. A link may carry measured per-collective alpha/beta (`collectives:`, written by
`meshplan calibrate`), which then replace its nominal latency, bandwidth and efficiency for that collective.
`activation_dtype` is the dtype activations live in on this machine (a collective in it needs no conversion);
`codec_efficiency` the fraction of HBM bandwidth the conversion to and from each other wire format reaches (the
encode/decode of a compressed collective, priced as memory traffic).

A link may also carry its own `efficiency` per collective (the span matters: NVLink all-to-all and IB rings reach
different shares of their links, docs/reference.md#links), which replaces the cluster-wide one on that link.
A GPU cluster may carry a `kernels:` section (KernelModel, docs/reference.md#kernels): the SM count, GEMM tile,
the efficiency of one full wave of tiles, the fixed cost of one kernel launch, FlashAttention's forward and backward
efficiency and the share of HBM bandwidth memory-bound kernels reach. Without it (CPU clusters fitted by
`meshplan calibrate`) GEMMs follow the smooth size efficiency prod x/(x + gemm_half_size).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..inputs import ConfigError, check_number, check_str, find_config, mapping, read_yaml
from ..resources import shipped

CLUSTER_DIR = shipped("clusters")
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p")
WIRE_DTYPES = ("fp32", "bf16", "fp8")


class ClusterError(ConfigError):
    """A cluster file is invalid; the message names the field (cluster.intra_node.bandwidth: ...)."""


@dataclass(frozen=True)
class AlphaBeta:
    latency: float  # seconds per step (alpha)
    bandwidth: float  # bytes/s (1/beta)


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s per direction
    latency: float
    collectives: dict[str, AlphaBeta] = field(default_factory=dict)  # measured, per collective kind
    efficiency: dict[str, float] = field(default_factory=dict)  # share of `bandwidth` per collective on this link

    def alpha_beta(self, kind: str, efficiency: float) -> AlphaBeta:
        if kind in self.collectives:
            return self.collectives[kind]
        return AlphaBeta(self.latency, self.bandwidth * self.efficiency.get(kind, efficiency))


@dataclass(frozen=True)
class KernelModel:
    """What one GPU's kernels achieve (docs/reference.md#kernels): a GEMM runs in waves of `tile` output tiles,
    `sm_count` at a time, each wave at `gemm_efficiency` of peak; every kernel costs `launch_s` more."""
    sm_count: int
    tile: tuple[int, int]  # output rows x columns one SM computes per wave
    gemm_efficiency: float  # fraction of peak FLOP/s one full wave reaches
    launch_s: float  # fixed cost of one kernel (launch and ramp), seconds
    attention_forward: float  # FlashAttention forward: fraction of peak
    attention_backward: float  # FlashAttention backward (2.5x the forward's FLOPs): fraction of peak
    memory_efficiency: float  # memory-bound kernels: fraction of HBM bandwidth
    fp8_speedup: float = 2.0  # dense FP8 / BF16 tensor-core peak (H100/H800: 1979 / 989 TFLOP/s)


@dataclass(frozen=True)
class Cluster:
    name: str
    peak_flops: float  # dense BF16 FLOP/s per GPU
    gemm_efficiency: float  # achievable fraction of peak for large GEMMs
    hbm_bytes: float
    hbm_bandwidth: float
    gpus_per_node: int
    intra_node: Link
    inter_node: Link
    gemm_half_size: float = 64.0  # a GEMM dimension of this size halves throughput: efficiency x/(x + c) per dim
    memory_fraction: float = 0.9  # usable share of HBM (allocator fragmentation, workspaces, NCCL buffers)
    collective_efficiency: dict[str, float] = field(default_factory=dict)
    activation_dtype: str = "bf16"  # fp32 | bf16: what a collective in that format sends without conversion
    codec_efficiency: dict[str, float] = field(default_factory=dict)  # wire dtype -> fraction of HBM bandwidth
    # CPU "clusters" only: the cores that the measured rates used, which a node's ranks then share (0: GPUs)
    cpu_cores: int = 0
    description: str = ""
    kernels: KernelModel | None = None  # None: the smooth size-efficiency model (CPU clusters)

    @property
    def memory_limit(self) -> float:
        return self.hbm_bytes * self.memory_fraction

    @property
    def achievable_flops(self) -> float:
        return self.peak_flops * self.gemm_efficiency

    def link(self, inter: bool) -> Link:
        return self.inter_node if inter else self.intra_node

    def efficiency(self, kind: str) -> float:
        return self.collective_efficiency.get(kind, 1.0)

    def codec(self, dtype: str) -> float:
        return self.codec_efficiency.get(dtype, 1.0)

    def local_slowdown(self, ranks_on_node: int) -> float:
        """How much slower one rank computes than the measured rates when `ranks_on_node` ranks share this CPU
        node's cores: r <= c ranks get c // r threads each; more ranks than cores time-share them. 1 for GPUs."""
        c = self.cpu_cores
        if c <= 0 or ranks_on_node <= 0:
            return 1.0
        return c / (c // ranks_on_node) if ranks_on_node <= c else float(ranks_on_node)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("intra_node", "inter_node"):
            for sub in ("collectives", "efficiency"):
                if not d[key][sub]:
                    del d[key][sub]
        if d["kernels"] is None:
            del d["kernels"]
        else:
            d["kernels"]["tile"] = list(d["kernels"]["tile"])
        return d

    def to_yaml(self, path: str | Path | None = None, header: str = "") -> str:
        text = header + yaml.safe_dump(self.to_dict(), sort_keys=False, width=120)
        if path is not None:
            Path(path).write_text(text)
        return text


def _number(where: str, v, positive: bool = True, at_most_one: bool = False) -> float:
    """A finite number (never NaN, inf or a bool): > 0 (positive) or >= 0, and <= 1 for a fraction."""
    x = check_number(where, v, ClusterError)
    if positive and x <= 0:
        raise ClusterError(f"{where}: must be > 0, got {v!r}")
    if x < 0:
        raise ClusterError(f"{where}: must be >= 0, got {v!r}")
    if at_most_one and x > 1:
        raise ClusterError(f"{where}: is a fraction, must be <= 1, got {v!r}")
    return x


def _fields(where: str, d, required: set[str], optional: set[str]) -> dict:
    if not isinstance(d, dict):
        raise ClusterError(f"{where}: expected a mapping, got {type(d).__name__}")
    for key in d:
        if key not in required | optional:
            close = difflib.get_close_matches(str(key), sorted(required | optional), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(required | optional))})"
            raise ClusterError(f"{where}.{key}: unknown field{hint}")
    for key in sorted(required):
        if key not in d:
            raise ClusterError(f"{where}.{key}: missing")
    return d


def _link(where: str, d) -> Link:
    d = _fields(where, d, {"bandwidth", "latency"}, {"collectives", "efficiency"})
    measured = {}
    coll = d.get("collectives") or {}
    if not isinstance(coll, dict):
        raise ClusterError(f"{where}.collectives: expected a mapping collective -> {{latency, bandwidth}}")
    for kind, ab in coll.items():
        if kind not in COLLECTIVES:
            raise ClusterError(f"{where}.collectives.{kind}: unknown collective (known: {', '.join(COLLECTIVES)})")
        ab = _fields(f"{where}.collectives.{kind}", ab, {"latency", "bandwidth"}, set())
        measured[kind] = AlphaBeta(_number(f"{where}.collectives.{kind}.latency", ab["latency"], positive=False),
                                   _number(f"{where}.collectives.{kind}.bandwidth", ab["bandwidth"]))
    eff = _fractions("efficiency", d, "collective", COLLECTIVES, where)
    return Link(_number(f"{where}.bandwidth", d["bandwidth"]), _number(f"{where}.latency", d["latency"], False),
                measured, {str(k): float(v) for k, v in eff.items()})


KERNEL_FIELDS = {"sm_count", "tile", "gemm_efficiency", "launch_s", "attention_forward", "attention_backward",
                 "memory_efficiency"}
KERNEL_OPTIONAL = {"fp8_speedup"}


def _kernels(d) -> KernelModel | None:
    if d is None:
        return None
    d = _fields("cluster.kernels", d, KERNEL_FIELDS, KERNEL_OPTIONAL)
    sms, tile = d["sm_count"], d["tile"]
    if isinstance(sms, bool) or not isinstance(sms, int) or sms < 1:
        raise ClusterError(f"cluster.kernels.sm_count: must be a positive integer, got {sms!r}")
    if not (isinstance(tile, (list, tuple)) and len(tile) == 2 and all(isinstance(x, int) and x > 0 for x in tile)):
        raise ClusterError(f"cluster.kernels.tile: must be [rows, columns], two positive integers, got {tile!r}")
    frac = {k: _number(f"cluster.kernels.{k}", d[k], at_most_one=True)
            for k in ("gemm_efficiency", "attention_forward", "attention_backward", "memory_efficiency")}
    return KernelModel(sms, (tile[0], tile[1]), launch_s=_number("cluster.kernels.launch_s", d["launch_s"],
                                                                   positive=False),
                       fp8_speedup=_number("cluster.kernels.fp8_speedup", d.get("fp8_speedup", 2.0)), **frac)


def _fractions(field_name: str, d: dict, what: str, known: tuple[str, ...], where: str = "cluster") -> dict:
    """An optional mapping `what` -> fraction in (0, 1], every key one of `known` (at `where`.field_name)."""
    m = d.get(field_name) or {}
    if not isinstance(m, dict):
        raise ClusterError(f"{where}.{field_name}: expected a mapping {what} -> fraction")
    for key, v in m.items():
        if key not in known:
            raise ClusterError(f"{where}.{field_name}.{key}: unknown {what} (known: {', '.join(known)})")
        _number(f"{where}.{field_name}.{key}", v, at_most_one=True)
    return m


def _cores(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 20:
        raise ClusterError(f"cluster.cpu_cores: must be an integer >= 0 (at most 2**20), got {v!r}")
    return v


def cluster_from_dict(d) -> Cluster:
    required = {"name", "peak_flops", "gemm_efficiency", "hbm_bytes", "hbm_bandwidth", "gpus_per_node",
                "intra_node", "inter_node"}
    optional = {"gemm_half_size", "memory_fraction", "collective_efficiency", "activation_dtype", "codec_efficiency",
                "cpu_cores", "description", "kernels"}
    d = _fields("cluster", d, required, optional)
    gpn = d["gpus_per_node"]
    if isinstance(gpn, bool) or not isinstance(gpn, int) or not 1 <= gpn <= 1 << 16:
        raise ClusterError(f"cluster.gpus_per_node: must be a positive integer <= 65536, got {gpn!r}")
    eff = _fractions("collective_efficiency", d, "collective", COLLECTIVES)
    act = d.get("activation_dtype", "bf16")
    if act not in WIRE_DTYPES[:2]:
        raise ClusterError(f"cluster.activation_dtype: {act!r}; expected one of {', '.join(WIRE_DTYPES[:2])}")
    codec = _fractions("codec_efficiency", d, "wire dtype", WIRE_DTYPES)
    return Cluster(
        name=check_str("cluster.name", d["name"], ClusterError),
        peak_flops=_number("cluster.peak_flops", d["peak_flops"]),
        gemm_efficiency=_number("cluster.gemm_efficiency", d["gemm_efficiency"], at_most_one=True),
        hbm_bytes=_number("cluster.hbm_bytes", d["hbm_bytes"]),
        hbm_bandwidth=_number("cluster.hbm_bandwidth", d["hbm_bandwidth"]),
        gpus_per_node=gpn,
        intra_node=_link("cluster.intra_node", d["intra_node"]),
        inter_node=_link("cluster.inter_node", d["inter_node"]),
        gemm_half_size=_number("cluster.gemm_half_size", d.get("gemm_half_size", 64.0), positive=False),
        memory_fraction=_number("cluster.memory_fraction", d.get("memory_fraction", 0.9), at_most_one=True),
        collective_efficiency={str(k): float(v) for k, v in eff.items()},
        activation_dtype=act,
        codec_efficiency={str(k): float(v) for k, v in codec.items()},
        cpu_cores=_cores(d.get("cpu_cores", 0)),
        description=check_str("cluster.description", d.get("description", ""), ClusterError, nonempty=False),
        kernels=_kernels(d.get("kernels")),
    )


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A YAML path, or the name of a file in $XDG_CONFIG_HOME/meshplan/clusters/ (where `meshplan calibrate`
    writes) or the shipped configs ("h800", "h100", "h200", "local")."""
    p = find_config("clusters", name_or_path, "cluster", ClusterError)
    return cluster_from_dict(mapping(f"cluster {str(p)!r}", read_yaml(p, "cluster", ClusterError), ClusterError))
