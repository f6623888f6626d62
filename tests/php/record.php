<?php
// Records one run of a job (see _common.php) so tests can count exactly-once.
require __DIR__ . '/_common.php';

$data = fw_require_data();
fw_record($data);
echo "ok\n";
