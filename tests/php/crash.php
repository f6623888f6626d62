<?php
// The PHP child dies (SIGKILL to itself) while running the job: with "early" in the data before
// any output, otherwise after flushing some output. Like a segfault or an OOM kill. Each run is
// recorded in "<FW_RECORD_FILE>.fail" first.
require __DIR__ . '/_common.php';
require __DIR__ . '/_attempts.php';

$data = fw_require_data();
fw_record_failure($data);
if (strpos($data, 'early') === false) {
    while (ob_get_level() > 0) {
        ob_end_flush();
    }
    echo str_repeat('x', 100000), "\n";
    flush();
}
posix_kill(getmypid(), 9);
sleep(5);
