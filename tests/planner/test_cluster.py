"""Cluster YAMLs load into typed Clusters; mistakes are reported with the field's path."""
import pytest
import yaml

from meshplan.planner.cluster import CLUSTER_DIR, ClusterError, cluster_from_dict, load_cluster


@pytest.mark.parametrize("name", ["h800", "h100", "h200"])
def test_shipped_clusters_load(name):
    c = load_cluster(name)
    assert c.peak_flops == pytest.approx(989e12) and c.gpus_per_node == 8
    assert c.inter_node.bandwidth == pytest.approx(50e9)
    assert 0 < c.gemm_efficiency <= 1 and c.memory_limit < c.hbm_bytes


def test_reference_hardware_numbers():
    assert load_cluster("h800").intra_node.bandwidth == pytest.approx(200e9)
    assert load_cluster("h100").intra_node.bandwidth == pytest.approx(450e9)
    h200 = load_cluster("h200")
    assert h200.hbm_bytes == pytest.approx(141e9) and h200.hbm_bandwidth == pytest.approx(4.8e12)


def _base():
    return yaml.safe_load((CLUSTER_DIR / "h800.yaml").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("peak_flops"), "cluster.peak_flops: missing"),
    (lambda d: d.update(peak_flop=1.0), "cluster.peak_flop: unknown field (did you mean 'peak_flops'?)"),
    (lambda d: d["intra_node"].pop("bandwidth"), "cluster.intra_node.bandwidth: missing"),
    (lambda d: d["inter_node"].update(latency="fast"), "cluster.inter_node.latency: must be a number"),
    (lambda d: d.update(gemm_efficiency=1.5), "cluster.gemm_efficiency: is a fraction"),
    (lambda d: d.update(gpus_per_node=0), "cluster.gpus_per_node: must be a positive integer"),
    (lambda d: d.update(collective_efficiency={"broadcast": 0.5}), "cluster.collective_efficiency.broadcast: unknown"),
    (lambda d: d["intra_node"]["efficiency"].update(broadcast=0.5), "cluster.intra_node.efficiency.broadcast: unknown"),
    (lambda d: d["inter_node"]["efficiency"].update(all_to_all=1.5), "cluster.inter_node.efficiency.all_to_all: is a"),
    (lambda d: d["kernels"].update(tile=[128]), "cluster.kernels.tile: must be [rows, columns]"),
    (lambda d: d["kernels"].update(sm_count=0), "cluster.kernels.sm_count: must be a positive integer"),
    (lambda d: d["kernels"].pop("launch_s"), "cluster.kernels.launch_s: missing"),
    (lambda d: d["intra_node"].update(collectives={"all_to_all": {"latency": 1e-6}}),
     "cluster.intra_node.collectives.all_to_all.bandwidth: missing"),
    (lambda d: d.update(activation_dtype="fp16"), "cluster.activation_dtype: 'fp16'; expected one of fp32, bf16"),
    (lambda d: d["codec_efficiency"].update(fp4=0.5), "cluster.codec_efficiency.fp4: unknown wire dtype"),
    (lambda d: d["codec_efficiency"].update(fp8=2.0), "cluster.codec_efficiency.fp8: is a fraction"),
    (lambda d: d.update(cpu_cores=-1), "cluster.cpu_cores: must be an integer >= 0"),
])
def test_field_errors_name_the_field(mutate, message):
    d = _base()
    mutate(d)
    with pytest.raises(ClusterError) as e:
        cluster_from_dict(d)
    assert message in str(e.value)


def test_unknown_cluster_lists_known():
    with pytest.raises(ClusterError, match="h800"):
        load_cluster("no-such-cluster")


def test_round_trip(tmp_path):
    c = load_cluster("h800")
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    assert load_cluster(path) == c


def test_cpu_ranks_share_the_measured_cores():
    """local.yaml's rates were measured with all of its cores: 2 ranks on 2 cores get 1 thread each (half the
    rate), 4 ranks time-share them (a quarter); GPU clusters have no cpu_cores and no slowdown."""
    import dataclasses

    cpu = dataclasses.replace(load_cluster("h800"), cpu_cores=2)
    assert [cpu.local_slowdown(r) for r in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]
    assert dataclasses.replace(cpu, cpu_cores=8).local_slowdown(3) == 8 / 2  # 3 ranks, 2 threads each
    assert load_cluster("h800").local_slowdown(8) == 1.0
