<?php
// A 10 ms job that records when it started: "<start unix time> <data>" per run, in
// <FW_RECORD_FILE>.start (tests measure how long after publishing a job started).
require __DIR__ . '/_common.php';

$started = microtime(true);
$data = fw_require_data();
$file = getenv('FW_RECORD_FILE', true) ?: sys_get_temp_dir() . '/fw_record.log';
file_put_contents($file . '.start', sprintf("%.6f %s\n", $started, $data), FILE_APPEND | LOCK_EX);
usleep(10000);
echo "ok\n";
