<?php
// Prints N bytes ("x" repeated) to STDOUT and, with "N,M", M bytes to the FastCGI STDERR too
// (through error_log(), which FPM sends as "PHP message: ..."): for responses over many records.
require __DIR__ . '/_common.php';

$parts = explode(',', trim(fw_data() ?? '0'));
$out = (int) $parts[0];
$err = isset($parts[1]) ? (int) $parts[1] : 0;
if ($err > 0) {
    error_log(str_repeat('e', $err));
}
echo str_repeat('x', $out);
