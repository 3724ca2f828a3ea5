"""A fake autoscaling node provider whose nodes take a while to "boot" (for tests only).

Ray's ``FakeMultiNodeProvider`` starts a worker node (a ``ray._private.node.Node``: raylet and
agents, on this machine) as soon as the autoscaler asks for one. Real GPU nodes take minutes.
:class:`DelayedFakeMultiNodeProvider` waits ``provider.launch_delay_s`` seconds before it starts
the nodes of a launch request, so a test can have nodes appear only after Ray Train's default
worker-group start timeout (60 s) would have expired.

Loaded by the autoscaler (the ``monitor`` process that ``ray start --head --autoscaling-config``
starts) as an external provider::

    provider:
      type: external
      module: delayed_fake_provider.DelayedFakeMultiNodeProvider
      launch_delay_s: 75
      gcs_address: "127.0.0.1:PORT"   # the fake nodes join this GCS (default: port 6379)
      ...

with this directory on the head process's ``PYTHONPATH`` and ``RAY_FAKE_CLUSTER=1``. The wait
runs in the autoscaler's node-launcher thread (outside the provider's lock), so the autoscaler's
update loop, ``non_terminated_nodes`` and idle termination keep running meanwhile.
"""
from __future__ import annotations

import logging
import time

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

logger = logging.getLogger(__name__)


class DelayedFakeMultiNodeProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self._launch_delay_s = float(provider_config.get("launch_delay_s", 0))

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        t0 = time.time()
        logger.info("DelayedFakeMultiNodeProvider: launch of %d node(s) requested; booting for %.0f s",
                    count, self._launch_delay_s)
        time.sleep(self._launch_delay_s)
        super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        logger.info("DelayedFakeMultiNodeProvider: %d node(s) started %.1f s after the request", count,
                    time.time() - t0)
