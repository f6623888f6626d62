<?php
// Like record.php, for a job that works for 10 ms first (scale-out tests need jobs that last).
require __DIR__ . '/_common.php';

$data = fw_require_data();
usleep(10000);
fw_record($data);
echo "ok\n";
