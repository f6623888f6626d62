<?php
// Always fails with an uncaught exception: Status 500 and the message on STDERR.
require __DIR__ . '/_common.php';

$data = fw_data() ?? '';
throw new RuntimeException('boom: ' . substr($data, 0, 40));
