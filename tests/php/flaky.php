<?php
// Fails the first time it runs a given data and succeeds every time after: a marker file
// "flaky-<sha1(data)>" next to FW_RECORD_FILE remembers the first run. Failed runs are recorded
// in "<FW_RECORD_FILE>.fail", successful ones like record.php.
require __DIR__ . '/_common.php';
require __DIR__ . '/_attempts.php';

$data = fw_require_data();
$marker = dirname(fw_record_file()) . '/flaky-' . sha1($data);
$first = @fopen($marker, 'x');   // atomic: exactly one run creates it
if ($first !== false) {
    fclose($first);
    fw_record_failure($data);
    throw new RuntimeException('flaky: first attempt for ' . sha1($data) . ' fails');
}
fw_record($data);
echo "ok\n";
