<?php
// Fails with an error text that is markup: the dashboard must show it as text, never run it.
require __DIR__ . '/_common.php';

fw_require_data();
throw new RuntimeException('<script>alert(1)</script><img src=x onerror="alert(2)"> & "quotes"');
