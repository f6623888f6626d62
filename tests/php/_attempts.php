<?php
// Shared by listener.php and flaky.php: records failed runs too, so tests can count attempts.
// Needs _common.php. Everything lives next to FW_RECORD_FILE (the FPM pool's env).

function fw_record_file(): string
{
    $file = getenv('FW_RECORD_FILE', true);
    return ($file === false || $file === '') ? sys_get_temp_dir() . '/fw_record.log' : $file;
}

// Appends "<pid> <sha1(data)> <strlen(data)>" to "<FW_RECORD_FILE>.fail", the format of fw_record().
function fw_record_failure(string $data): void
{
    $line = getmypid() . ' ' . sha1($data) . ' ' . strlen($data) . "\n";
    if (file_put_contents(fw_record_file() . '.fail', $line, FILE_APPEND | LOCK_EX) === false) {
        throw new RuntimeException('cannot append to ' . fw_record_file() . '.fail');
    }
}

// The flag file whose existence means "the cause was removed": FW_FIXED_FILE from the pool's
// env, else "fixed" next to FW_RECORD_FILE.
function fw_fixed_file(): string
{
    $file = getenv('FW_FIXED_FILE', true);
    return ($file === false || $file === '') ? dirname(fw_record_file()) . '/fixed' : $file;
}
