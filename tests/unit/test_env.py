"""Rank discovery from torchrun, Slurm and nothing at all."""

import pytest

from dtrain.distributed.env import discover_env, first_host, run_id, slurm_master_port


def test_single_process_fallback():
    env = discover_env({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")


def test_torchrun_variables():
    env = discover_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29999", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.source, env.restart_count) == ("10.0.0.2", 29999, "torchrun", 2)


def test_torchrun_wins_inside_a_slurm_allocation():
    env = discover_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "SLURM_PROCID": "0",
                        "SLURM_NTASKS": "1"})
    assert env.source == "torchrun" and env.rank == 1


def test_slurm_task_variables():
    env = discover_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_JOB_ID": "123456",
                        "SLURM_NTASKS_PER_NODE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu003" and env.source == "slurm"
    assert env.master_port == slurm_master_port("123456") == 10000 + 3456


@pytest.mark.parametrize("nodelist,head", [("node1", "node1"), ("node[1-4]", "node1"),
                                           ("gpu[007,009-011],cpu1", "gpu007"), ("a-b-c[09]", "a-b-c09"),
                                           ("host1,host2", "host1")])
def test_first_host_of_node_list(nodelist, head):
    assert first_host(nodelist) == head


def test_inconsistent_variables_are_named():
    with pytest.raises(ValueError, match="RANK='x'"):
        discover_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 is outside world size 4"):
        discover_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    # half of what torchrun sets: the process group could never form
    with pytest.raises(ValueError, match="MASTER_PORT is not; start the job with torchrun"):
        discover_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    assert discover_env({"RANK": "0", "WORLD_SIZE": "1"}).world_size == 1  # one rank needs no rendezvous


def test_run_id_prefers_ids_that_survive_requeue():
    assert run_id({"SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "abc"}) == "slurm-77"
    assert run_id({"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == "slurm-70_3"
    assert run_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert run_id({}) is None
