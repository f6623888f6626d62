<?php
// Records the request body and two params (json and raw formats): sha1 of "body|TENANT|AMQP_MESSAGE_ID".
require __DIR__ . '/_common.php';

$input = file_get_contents('php://input');
fw_record($input . '|' . ($_SERVER['TENANT'] ?? '') . '|' . ($_SERVER['AMQP_MESSAGE_ID'] ?? ''));
echo "ok\n";
