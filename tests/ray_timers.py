"""A Ray ``worker_process_setup_hook`` for the tests' multi-node clusters.

Ray Train's elastic policy sizes a worker group from the AutoscalingCoordinator's view of the
cluster, which that actor refreshes every 20 s: a node lost or added stays unseen that long, and a
group sized on the stale view waits out Ray Train's worker-group start timeout. The tests refresh
every second; what the run does is unchanged, only when it notices."""


def coordinator_ticks_every_second() -> None:
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    coordinator._AutoscalingCoordinatorActor.TICK_INTERVAL_S = 1
