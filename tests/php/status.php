<?php
// Answers with the status in the data: "503" -> http_response_code(503); any other text is
// sent as a raw header line (e.g. "Status: 404 Not Found").
require __DIR__ . '/_common.php';

$data = trim(fw_data() ?? '200');
if (ctype_digit($data)) {
    http_response_code((int) $data);
} else {
    header($data);
}
echo "status $data\n";
