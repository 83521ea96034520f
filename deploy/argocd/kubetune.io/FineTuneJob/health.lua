-- Argo CD health check for kubetune.io FineTuneJob.
-- Uses only Lua's base and table libraries: Argo CD runs argocd-cm customizations without
-- the string and math libraries unless useOpenLibs is set.
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

-- "Reason: message" of a condition, or the fallback.
local function explain(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

-- x with `digits` decimals, built from integers so that every Lua prints it the same way
-- (Lua 5.1 and Argo CD's gopher-lua format fractional numbers differently).
local function fixed(x, digits)
  local scale = 1
  for _ = 1, digits do
    scale = scale * 10
  end
  local sign = ""
  if x < 0 then
    sign = "-"
    x = -x
  end
  local n = x * scale + 0.5
  n = n - n % 1
  local frac = n % scale
  local text = sign .. ((n - frac) / scale)
  if digits > 0 then
    local f = "" .. frac
    while #f < digits do
      f = "0" .. f
    end
    text = text .. "." .. f
  end
  return text
end

local function duration(s)
  s = s - s % 1
  local h = (s - s % 3600) / 3600
  local m = (s % 3600 - s % 60) / 60
  if h > 0 then
    return h .. "h" .. m .. "m"
  end
  if m > 0 then
    return m .. "m" .. (s % 60) .. "s"
  end
  return s .. "s"
end

-- "step 120/500 (24%), loss 1.23, ETA 5m0s" from status.progress (the trainer's reports).
local function progress(status)
  local p = status.progress
  if p == nil or p.step == nil then
    return nil
  end
  local parts = {}
  if p.totalSteps ~= nil then
    local text = "step " .. p.step .. "/" .. p.totalSteps
    if p.percent ~= nil then
      text = text .. " (" .. fixed(p.percent, 0) .. "%)"
    end
    table.insert(parts, text)
  else
    table.insert(parts, "step " .. p.step)
  end
  if p.trainLoss ~= nil then
    table.insert(parts, "loss " .. fixed(p.trainLoss, 3))
  end
  if p.etaSeconds ~= nil then
    table.insert(parts, "ETA " .. duration(p.etaSeconds))
  end
  return table.concat(parts, ", ")
end

local status = obj.status
local generation = obj.metadata.generation
if status == nil or status.phase == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to reconcile the FineTuneJob"
  return hs
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator: status is for generation " .. status.observedGeneration
    .. ", spec is at generation " .. generation
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = explain(condition(status, "Succeeded"), "Succeeded")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = explain(condition(status, "Failed"), "Failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = explain(condition(status, "Suspended"), "Suspended by runPolicy.suspend")
elseif phase == "Queued" then
  -- Kueue admits it without anyone acting: progressing, not suspended by a user.
  hs.status = "Progressing"
  hs.message = explain(condition(status, "Suspended"), "Queued")
elseif phase == "Running" then
  hs.status = "Progressing"
  local p = progress(status)
  if p ~= nil then
    hs.message = "Running: " .. p
  else
    hs.message = explain(condition(status, "Running"), "Running")
  end
elseif phase == "Pending" then
  hs.status = "Progressing"
  local scheduled = condition(status, "PodsScheduled")
  if scheduled ~= nil and scheduled.status == "False" then
    hs.message = explain(scheduled, "Pending")
  else
    hs.message = explain(condition(status, "Running"), "Pending")
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase
end
return hs
