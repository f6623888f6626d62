<?php
// An event listener with a bug: it throws for every event whose (base64-decoded) data contains
// "FAIL", until the bug is fixed, i.e. the flag file fw_fixed_file() exists. Each run is
// recorded: successes like record.php, failures in "<FW_RECORD_FILE>.fail". The exception text
// names sha1(data), so a dead letter's error can be matched to its event.
require __DIR__ . '/_common.php';
require __DIR__ . '/_attempts.php';

$data = fw_require_data();
if (strpos(fw_decoded($data), 'FAIL') !== false && !file_exists(fw_fixed_file())) {
    fw_record_failure($data);
    throw new RuntimeException('listener failed for event ' . sha1($data));
}
fw_record($data);
echo "ok\n";
