<?php
// Fails if the (base64-decoded) data contains "FAIL", otherwise records like record.php.
require __DIR__ . '/_common.php';

$data = fw_require_data();
if (strpos($data, 'FAIL') !== false || strpos(fw_decoded($data), 'FAIL') !== false) {
    throw new RuntimeException('boom: ' . substr(fw_decoded($data), 0, 40));
}
fw_record($data);
echo "ok\n";
