<?php
// Prints N MiB of "x" to STDOUT (N from the data), 1 MiB at a time, then records the run: a job
// whose output is far larger than anything the worker keeps.
require __DIR__ . '/_common.php';

$data = fw_require_data();
$chunk = str_repeat('x', 1 << 20);
for ($i = (int) $data; $i > 0; $i--) {
    echo $chunk;
}
fw_record($data);
