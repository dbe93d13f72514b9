// Which physical pages two processes share, from /proc/PID/pagemap: how
// `ebb ps --fleet` tells what a worker still shares with the fork server it
// came from (--preload) apart from what it shares with anyone (libraries).
// Only private anonymous pages count: the memory a fork shares copy-on-write.
// Reading page frame numbers needs CAP_SYS_ADMIN; without it the kernel
// reports them as 0 and these functions return nullopt.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ebb::proc {

// The page frame numbers of every resident private anonymous page of `pid`,
// sorted and without duplicates; nullopt when they cannot be read.
std::optional<std::vector<uint64_t>> resident_frames(pid_t pid, const std::string& proc_root = "/proc");

// Bytes of `pid`'s resident private anonymous pages whose frame is in
// `frames` (sorted).
std::optional<uint64_t> bytes_in_frames(pid_t pid, const std::vector<uint64_t>& frames,
                                        const std::string& proc_root = "/proc");

}  // namespace ebb::proc
