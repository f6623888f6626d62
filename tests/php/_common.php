<?php
// Shared by the test scripts: where the job's data is and where records go.
// The bundle's dispatch.php reads $_SERVER['DEFERRED_DATA'] first, then $_POST (large payloads
// travel as an urlencoded POST body).

function fw_data(): ?string
{
    if (isset($_SERVER['DEFERRED_DATA'])) {
        return $_SERVER['DEFERRED_DATA'];
    }
    if (isset($_POST['DEFERRED_DATA'])) {
        return $_POST['DEFERRED_DATA'];
    }
    return null;
}

function fw_require_data(): string
{
    $data = fw_data();
    if ($data === null) {
        http_response_code(400);
        error_log(basename($_SERVER['SCRIPT_FILENAME'] ?? 'script') . ': no DEFERRED_DATA');
        exit;
    }
    return $data;
}

// The base64-decoded data when it decodes cleanly, else the data as is.
function fw_decoded(string $data): string
{
    $decoded = base64_decode($data, true);
    return $decoded === false ? $data : $decoded;
}

// One line per run: "<pid> <sha1(data)> <strlen(data)>", appended under an exclusive lock.
// The file comes from the FPM pool's env (local_only: a FastCGI param cannot redirect it).
function fw_record(string $data): void
{
    $file = getenv('FW_RECORD_FILE', true);
    if ($file === false || $file === '') {
        $file = sys_get_temp_dir() . '/fw_record.log';
    }
    $line = getmypid() . ' ' . sha1($data) . ' ' . strlen($data) . "\n";
    if (file_put_contents($file, $line, FILE_APPEND | LOCK_EX) === false) {
        throw new RuntimeException("cannot append to $file");
    }
}
