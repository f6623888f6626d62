<?php
// Sleeps for the number of seconds in the data (a float), then prints ok.
require __DIR__ . '/_common.php';

$seconds = (float) trim(fw_data() ?? '0');
if ($seconds > 0) {
    usleep((int) round($seconds * 1e6));
}
echo "ok\n";
