<?php
// Like record.php, for a job that works for 2 ms first: the failover test (test_cluster.py) needs
// a run of 10,000 jobs to last longer than rabbitmqctl takes to stop a node.
require __DIR__ . '/_common.php';

$data = fw_require_data();
usleep(2000);
fw_record($data);
echo "ok\n";
