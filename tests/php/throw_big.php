<?php
// Throws an uncaught exception whose message is N bytes long (N from the data): PHP writes it
// whole to the FastCGI STDERR, one line of N bytes.
require __DIR__ . '/_common.php';
require __DIR__ . '/_attempts.php';

$data = fw_require_data();
fw_record_failure($data);
throw new RuntimeException('big: ' . str_repeat('E', (int) $data));
